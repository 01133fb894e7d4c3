"""The demo pipeline on its reduced (--quick) setting, and the report generator on known records."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import report


def _records():
    layers = [{"name": "stem_conv", "lower": 1.0, "upper": 1.05}, {"name": "blocks.0.layer.0.conv1", "lower": 2.0, "upper": 2.1},
              {"name": "blocks.1.layer.0.conv1", "lower": 1.5, "upper": 1.52}, {"name": "blocks.2.layer.0.conv2", "lower": 3.0, "upper": 3.3},
              {"name": "fc", "lower": 0.7, "upper": 0.7}]
    return [
        {"name": "wrn-tiny", "depths": [1, 1, 1], "widths": [8, 16, 32, 64], "params": 120000, "clean_acc": 0.9,
         "robust_acc": 0.5, "certified_lipschitz": 300.0, "certified_lipschitz_product": 3000.0,
         "empirical_lipschitz": 8.0, "attack_lipschitz": 6.0, "theory_prediction": 50.0, "layers": layers,
         "stage_bounds": {"stage1": 3.0, "stage2": 4.0, "stage3": 5.0}, "eps": 0.1, "robust_attack": "pgd20",
         "searched_lipschitz": 12.0, "node_lower": {"stage1": 2.0, "stage2": 1.0, "stage3": 2.5}},
        {"name": "wrn-tiny-r", "depths": [1, 1, 1], "widths": [8, 16, 32, 32], "params": 60000, "clean_acc": 0.88,
         "robust_acc": 0.55, "certified_lipschitz": 200.0, "certified_lipschitz_product": 2000.0,
         "empirical_lipschitz": 6.0, "attack_lipschitz": 5.0, "theory_prediction": 40.0, "layers": layers,
         "stage_bounds": {"stage1": 3.0, "stage2": 4.0, "stage3": 4.0}, "eps": 0.1, "robust_attack": "pgd20"},
    ]


def test_report_from_known_records(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"kind": "demo", "name": "t", "models": _records()}))
    path = report.write_report(tmp_path)
    text = path.read_text()
    for png in ("layer_norms.png", "certified_vs_empirical.png", "robustness_vs_last_width.png"):
        assert (tmp_path / png).stat().st_size > 5000
        assert f"]({png})" in text
    assert text.count("Regenerate: `archlip report") == 3
    assert "certified_lipschitz (certified_upper)" in text and "empirical_lipschitz (lower)" in text
    assert "| wrn-tiny-r |" in text and "stage3" in text
    assert "## Per-block tightness" in text and "| network | 300 | 12 | 25 |" in text and "| stage2 | 4 | 1 | 4 |" in text
    # the theory's numbers are labelled with the weights they describe, and single runs are never ordered
    assert "theory_prediction (estimate; a priori: iid random weights, not the trained ones)" in text
    assert "theory a priori, iid std 0.05 (estimate)" in text and "theory with trained layer norms (certified_upper)" in text
    assert "no ordering here is a claim" in text and "lowest first" not in text
    assert report.ranking([{"name": "a", "x": 1.0}, {"name": "b", "x": 1.0}, {"name": "c"}], "x") == "a (1) = b (1)"


def test_stage_of_and_spearman():
    assert report.stage_of("blocks.2.layer.0.convShortcut") == "stage3"
    assert report.stage_of("block1.layer.0.conv1") == "stage1"
    assert report.stage_of("layer4.1.conv2") == "stage4"
    assert report.stage_of("stem_conv") == "stem" and report.stage_of("fc") == "head"
    assert report.spearman([1, 2, 3, 4], [4, 3, 2, 1])["rho"] == pytest.approx(-1.0)
    assert report.spearman([1, 2], [1, 2])["rho"] is None
    assert report.spearman([1, 2, 3, None, float("nan")], [3, 2, 1, 0, 0])["n"] == 3


def test_network_bound_answers_tightest_stage_and_block_bounds():
    from lipschitz.bounds import NetworkBound
    from spectral.guarantee import Guarantee, NormValue

    nb = NetworkBound(NormValue(12.0, Guarantee.UPPER, "network_folded+liplt"), "folded+liplt", (1, 8, 8),
                      {"product": 100.0, "folded": 20.0, "folded+liplt": 12.0, "lipsdp": float("inf")},
                      nodes=[{"name": "stage1", "role": "stage", "product": 5.0, "folded": 3.0, "folded+liplt": 3.5},
                             {"name": "stage1.block0", "role": "block", "product": 2.0, "folded": 2.5},
                             {"name": "stage2", "role": "stage", "lipsdp": 1.0},
                             {"name": "stem", "role": "stem", "product": 1.0}])
    assert nb.tightest == 12.0 and nb.certified_methods() == {"product": 100.0, "folded": 20.0, "folded+liplt": 12.0}
    assert nb.stage_bounds() == {"stage1": 3.0, "stage2": None} and nb.block_bounds() == {"stage1.block0": 2.0}
    smaller = NetworkBound(NormValue(7.0, Guarantee.UPPER, "network_lipsdp"), "lipsdp", (1, 8, 8), {"product": 9.0})
    assert smaller.tightest == 7.0
    assert NetworkBound(NormValue(float("inf"), Guarantee.UPPER, "x"), "x", (1,), {}).tightest is None


def test_measure_step_sandwiches_each_raw_layer_once(monkeypatch):
    """The demo's measure step (spectral, then bound): network_bound reuses the analysis's raw-layer sandwiches, so
    each layer's own operator is sandwiched once; a conv with a BatchNorm folded in is a second operator."""
    import importlib

    import torch
    from torch import nn

    from experiments.measure import measure_model

    # spectral.sandwich / spectral.analyze are also functions on the package: patch the modules themselves
    sandwich_module, analyze_module = (importlib.import_module(f"spectral.{n}") for n in ("sandwich", "analyze"))
    real, calls = sandwich_module.sandwich, []

    def spy(weight, input_shape, *args, **kwargs):
        calls.append(weight.detach().double().clone())
        return real(weight, input_shape, *args, **kwargs)

    monkeypatch.setattr(sandwich_module, "sandwich", spy)
    monkeypatch.setattr(analyze_module, "sandwich", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    record = measure_model(model, name="m", input_shape=(1, 8, 8), x_test=torch.zeros(2, 1, 8, 8),
                           y_test=torch.zeros(2, dtype=torch.long), eps=0.1, rtol=0.05, steps=("spectral", "bound"),
                           verbose=False)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers:
        assert sum(torch.equal(w, layer.weight.detach().double()) for w in calls) == 1
    assert record.layers[0]["folded_batchnorm"] == "1"
    raw = {r["name"]: r["upper"] for r in record.layers if not r["folded_batchnorm"]}
    assert raw == {r["name"]: r["upper"] for r in record.bound["layers"] if r["name"] in raw} and len(raw) == 2
    # the record as record.json holds it reads back to the same record and writes out the same JSON
    from experiments.io import to_jsonable
    from experiments.records import ModelRecord

    on_disk = json.loads(json.dumps(to_jsonable(record.to_dict())))
    assert list(on_disk)[:3] == ["name", "params", "model"] and on_disk["seconds"].keys() == {"spectral", "bound"}
    back = ModelRecord.from_dict(on_disk)
    assert back.to_dict() == on_disk and list(back.to_dict()) == list(on_disk)
    assert back.certified_lipschitz == record.certified_lipschitz and back.layers == on_disk["layers"]


def test_model_record_reads_and_writes_an_old_record_unchanged():
    """A record written before ModelRecord (a sweep run's summary.json): keys the class does not know, a key present
    with null, a partial set of steps; typed fields read back, the JSON written out is the same, key order included."""
    from experiments.records import ModelRecord

    old = {"name": "d1-1-1_w8-16-32-32_s0", "depths": [1, 1, 1], "widths": [8, 16, 32, 32], "params": 40000,
           "clean_acc": 0.9, "robust_acc": 0.5, "robust_attack": "pgd20", "eval_points": None,
           "seconds": {"eval": 1.5}, "unavailable": {"bound": "no module named cvxpy"},
           "stage_bounds": {"stage1": {"value": 3.0, "guarantee": "certified_upper"}}, "worker_pid": 1234,
           "train": {"seed": 0, "epochs": 2}, "config_id": "d1-1-1_w8-16-32-32", "seed": None, "groups": ["last"]}
    record = ModelRecord.from_dict(old)
    assert record.to_dict() == old and list(record.to_dict()) == list(old)
    assert record.widths == [8, 16, 32, 32] and record.extra == {"worker_pid": 1234} and record.seed is None
    assert record.get("eval_points", "?") is None and record.get("certified_lipschitz", "?") == "?"
    assert record.has("seed") and not record.has("bound") and record.get("worker_pid") == 1234
    record.update({"run_seconds": 3.0})
    assert list(record.to_dict())[-1] == "run_seconds"
    with pytest.raises(ValueError, match="JSON object"):
        ModelRecord.from_dict([old])


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    from experiments.demo import run_demo

    result = run_demo(tmp_path, quick=True, verbose=False)
    results = json.loads(Path(result["results"]).read_text())
    assert results["kind"] == "demo"
    models = {m["name"]: m for m in results["models"]}
    assert set(models) == {"wrn-tiny", "wrn-tiny-r"}
    assert models["wrn-tiny"]["widths"][-1] > models["wrn-tiny-r"]["widths"][-1]
    assert models["wrn-tiny"]["params"] > models["wrn-tiny-r"]["params"]
    for m in models.values():
        assert not m.get("unavailable"), m.get("unavailable")
        assert 0 <= m["robust_acc"] <= m["clean_acc"] <= 1
        assert m["layers"] and all(r["lower"] <= r["upper"] * (1 + 1e-6) for r in _rows(m["layers"]))
        # the truth lies between the data lower bounds and the certified upper bounds
        assert 0 < m["empirical_lipschitz"] <= m["certified_lipschitz"] <= m["certified_lipschitz_product"] * (1 + 1e-9)
        assert 0 < m["attack_lipschitz"] <= m["certified_lipschitz"]
        assert m["empirical_lipschitz"] <= m["searched_lipschitz"] * (1 + 1e-6) <= m["certified_lipschitz"] * (1 + 1e-6)
        certified = {**m["stage_bounds"], **m["block_bounds"]}
        assert m["node_lower"] and set(m["node_lower"]) == set(certified)
        assert all(0 < low <= certified[name] for name, low in m["node_lower"].items())
        assert m["stage_bounds"] and m["theory_prediction"] > 0
        # the theory's rule with the trained layers' certified norms is a certified upper bound of the trained model
        assert m["theory_measured_norms"] >= m["empirical_lipschitz"]
        assert 0.8 <= m["theory_measured_norms"] / m["certified_lipschitz_product"] <= 1.25
    for name in ("digits-pgdat-tiny", "digits-pgdat-tiny-r"):
        assert (tmp_path / name / "resolved_config.yaml").is_file()
    text = Path(result["report"]).read_text()
    for png in ("layer_norms.png", "certified_vs_empirical.png", "robustness_vs_last_width.png"):
        assert (tmp_path / png).stat().st_size > 5000 and png in text
    assert "## Per-block tightness" in text


def _rows(layers):
    return [{"lower": _v(r["lower"]), "upper": _v(r["upper"])} for r in layers]


def _v(x):
    return x["value"] if isinstance(x, dict) else x
