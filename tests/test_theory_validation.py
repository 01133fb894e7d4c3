"""The validation experiment (experiments.theory_validation) on a quick grid."""
from __future__ import annotations

import json
import math

import pytest

from experiments.theory_validation import evaluate_config, run_validation


@pytest.mark.slow
def test_quick_validation_writes_results_and_correlates(tmp_path):
    summary = run_validation(tmp_path, quick=True, progress=False)
    for name in ("theory_validation.json", "theory_layers.csv", "theory_networks.csv", "theory_layers.png",
                 "theory_networks.png", "theory_last_stage.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "theory_validation.json").read_text())
    assert len(data["configs"]) == 10
    for regime in ("init", "fixed"):
        reg = summary["regimes"][regime]
        assert reg["layer_rel_err_median"] < 0.05
        assert reg["spearman_predicted_vs_measured"] > 0.8
    # fixed-variance regime: shrinking the last stage lowers the measured and the predicted bound
    fixed = {tuple(c["multipliers"]): c for c in data["configs"] if c["regime"] == "fixed"}
    for key in ("network_measured", "network_predicted", "network_symbolic"):
        assert fixed[(1.0, 1.0, 0.5)][key] < fixed[(1.0, 1.0, 1.0)][key] < fixed[(1.0, 1.0, 2.0)][key]


def test_one_config_against_certified_bound():
    c = evaluate_config((1.0, 1.0, 0.5), "init", input_size=8, seed=0, certified=True)
    assert c["guarantees"]["network_certified_product"] == "certified_upper"
    assert c["network_certified_product"] > 0
    # predicted and measured composed with the same rules agree to within the per-layer errors
    assert abs(math.log(c["network_predicted"] / c["network_measured"])) < math.log(1.3)
    for layer in c["layers"]:
        assert layer["measured_guarantee"].startswith("exact")


def test_unknown_regime():
    with pytest.raises(ValueError, match="valid: init, fixed"):
        evaluate_config((1.0, 1.0, 1.0), "trained", input_size=8, seed=0)
