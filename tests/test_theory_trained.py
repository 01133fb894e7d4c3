"""lipschitz.theory.trained and experiments.theory_validation's trained-weight helpers against ground truths:
the symbolic closed form, the graph composition, certified network bounds, Jacobian norms, known synthetic laws."""
from __future__ import annotations

import math

import pytest
import torch

from experiments.models import create_model
from experiments.theory_validation import _layer_input_shapes, compose_bound, trained_theory, wrn_values
from lipschitz import graph_from_module
from lipschitz.theory import symbolic
from lipschitz.theory.trained import (LayerFact, composed_bound, fit_log_linear, fit_trained_model, leave_one_out,
                                      predict_norms, predicted_norms)


@pytest.mark.parametrize("depths,widths", [((1, 1, 2), (8, 16, 32, 16)), ((5, 5, 5), (16, 320, 640, 512)),
                                           ((2, 1), (16, 16, 64))])
@pytest.mark.parametrize("model,std", [("fixed", 0.05), ("kaiming_normal_fan_out", None), ("kaiming_normal_fan_in", None)])
def test_composition_with_predicted_norms_is_the_symbolic_closed_form(depths, widths, model, std):
    kw = dict(weight_model=model, std=std, bn_gain=0.9, input_size=8 * 2 ** (len(depths) - 1), in_channels=1)
    mine = composed_bound(predicted_norms(depths, widths, **kw))
    ref = symbolic.lipschitz_bound(depths, widths, **kw)
    assert mine.value == pytest.approx(ref.value, rel=1e-12)
    assert mine.details["stages"] == pytest.approx(ref.details["stages"], rel=1e-12)


def _perturbed_wrn(depths=(1, 1, 2), widths=(8, 16, 32, 16), seed=0):
    torch.manual_seed(seed)
    model = create_model("wrn-tiny", in_channels=1, depths=depths, widths=widths).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.3, 3.0)
            m.weight.data.uniform_(-1.5, 1.5)
    return model


def _exact_norm(model, shapes):
    from spectral.exact import operator_norm_dense
    from spectral.operators import LayerOperator

    def norm(m):
        return operator_norm_dense(LayerOperator.from_module(m, shapes[id(m)][-1:] if isinstance(m, torch.nn.Linear)
                                                             else shapes[id(m)])).value
    return norm


def test_block_formula_equals_the_graph_composition_with_the_same_layer_norms():
    model = _perturbed_wrn()
    shapes = _layer_input_shapes(model, (1, 8, 8))
    norm = _exact_norm(model, shapes)
    norms, facts = wrn_values(model, (1, 8, 8), norm)
    parts: dict[str, float] = {}
    graph_value = compose_bound(graph_from_module(model, (1, 8, 8)), norm, shapes, parts)
    mine = composed_bound(norms)
    # equal up to float32 round-off of the batch-norm gains (computed in two different operation orders)
    assert mine.value == pytest.approx(graph_value, rel=1e-6)
    assert mine.details["stages"] == pytest.approx([parts["stage1"], parts["stage2"], parts["stage3"]], rel=1e-6)
    kinds = {(f.stage, f.kind) for f in facts}
    assert {("stem", "conv"), ("stage3", "shortcut"), ("stage3", "bn"), ("head", "fc"), ("head", "bn")} <= kinds
    assert sum(f.kind == "conv" and f.stage == "stage3" for f in facts) == 4  # two blocks of two convs


def test_trained_theory_is_a_certified_bound_close_to_the_certified_product():
    from lipschitz.bounds import network_bound
    from lipschitz.lower import jacobian_norm_lower

    model = _perturbed_wrn(seed=3)
    out = trained_theory(model, (1, 8, 8), rtol=1e-3)
    norms, _ = wrn_values(model, (1, 8, 8), _exact_norm(model, _layer_input_shapes(model, (1, 8, 8))))
    exact_rule = composed_bound(norms).value  # the rule with exact layer norms (dense SVD)
    # (float32 weights: the exact reference carries ~1e-7 round-off per factor)
    assert exact_rule * (1 - 1e-5) <= out["theory_measured_norms"] <= exact_rule * 1.001 ** 12
    # lipschitz.bounds' product method composes with the same rules from its own certified layer norms
    product = network_bound(model, (1, 8, 8), method="product", compare=False, rtol=1e-3).value.value
    assert product >= exact_rule * (1 - 1e-6) and product == pytest.approx(exact_rule, rel=0.1)
    lower = jacobian_norm_lower(model, torch.rand(16, 1, 8, 8), n_iter=30, seed=0).value
    assert out["theory_measured_norms"] >= lower
    assert len(out["theory_measured_stage_factors"]) == 3 and out["theory_structure"]["input_size"] == 8
    # rows from spectral.analyze are used by name when their gap is within rtol, instead of re-sandwiching
    stem = next(f["value"] for f in out["theory_facts"] if f["stage"] == "stem")
    rows = [{"name": "stem_conv", "upper": 123.0, "gap": 0.0}]
    with_rows = trained_theory(model, (1, 8, 8), rows, rtol=1e-3)
    assert with_rows["theory_measured_norms"] / out["theory_measured_norms"] == pytest.approx(123.0 / stem, rel=1e-6)
    loose = trained_theory(model, (1, 8, 8), [{"name": "stem_conv", "upper": 123.0, "gap": 0.5}], rtol=1e-3)
    assert loose["theory_measured_norms"] == pytest.approx(out["theory_measured_norms"], rel=1e-9)
    # analyze folds the next block's bn1 into the stem (conv -> BN): that norm already holds a gain the rule multiplies
    folded = [{"name": "stem_conv", "upper": 123.0, "gap": 0.0, "folded_batchnorm": "blocks.0.layer.0.bn1"}]
    assert trained_theory(model, (1, 8, 8), folded, rtol=1e-3)["theory_measured_norms"] == pytest.approx(
        out["theory_measured_norms"], rel=1e-9)


def test_trained_theory_with_real_analyze_rows_equals_the_rule_with_exact_norms():
    from experiments.measure import layer_table

    model = _perturbed_wrn(seed=4)
    rows = layer_table(model, (1, 8, 8), rtol=1e-3)
    assert any(r.get("folded_batchnorm") for r in rows)
    norms, _ = wrn_values(model, (1, 8, 8), _exact_norm(model, _layer_input_shapes(model, (1, 8, 8))))
    value = trained_theory(model, (1, 8, 8), rows, rtol=1e-3)["theory_measured_norms"]
    assert value == pytest.approx(composed_bound(norms).value, rel=0.02)


def test_trained_theory_skips_models_that_are_not_preactivation_wrns():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    assert trained_theory(model, (1, 8, 8)) == {}


def test_log_linear_fit_recovers_a_known_law_and_handles_constant_features():
    pts = [(w, d, 2.0 * w ** 0.3 * math.exp(-0.1 * d)) for w in (8, 16, 32, 64) for d in (1, 2, 3)]
    law = fit_log_linear(pts)
    assert (law.a, law.b, law.c) == pytest.approx((math.log(2.0), 0.3, -0.1), abs=1e-10)
    assert law(24, 2) == pytest.approx(2.0 * 24 ** 0.3 * math.exp(-0.2))
    flat = fit_log_linear([(16, 1, 3.0), (16, 1, 5.0)])  # width and depth never vary: slopes 0, the mean in log
    assert flat.b == 0 and flat.c == 0 and flat(16, 1) == pytest.approx(math.sqrt(15))
    with pytest.raises(ValueError, match="no positive"):
        fit_log_linear([(8, 1, -1.0)])


def _facts_from_law(depths, widths, value):
    facts = [LayerFact("stem", "conv", widths[0], 0, value("stem", "conv", widths[0], 0), 0.1)]
    for i, d in enumerate(depths):
        w, stage = widths[i + 1], f"stage{i + 1}"
        facts += [LayerFact(stage, k, w, d, value(stage, k, w, d), 0.1) for k in ("conv", "bn", "shortcut")]
    facts += [LayerFact("head", k, widths[-1], depths[-1], value("head", k, widths[-1], depths[-1]), 0.1)
              for k in ("bn", "fc")]
    return facts


def test_leave_one_out_predicts_held_out_configurations_of_an_exact_law():
    def value(stage, kind, w, d):
        return {"conv": 0.5, "bn": 1.2, "shortcut": 0.3, "fc": 0.1}[kind] * w ** 0.25 * math.exp(0.05 * d)

    configs = {f"c{j}": ((1, 1, d), (8, 16, 32, w)) for j, (d, w) in enumerate([(1, 16), (1, 32), (1, 64), (2, 16), (2, 64)])}
    facts = {c: _facts_from_law(d, w, value) for c, (d, w) in configs.items()}
    model = fit_trained_model([f for fs in facts.values() for f in fs])
    structure, measured = {}, {}
    for c, (d, w) in configs.items():
        structure[c] = {"depths": d, "widths": w, "input_size": 8}
        measured[c] = composed_bound(predict_norms(model, d, w, input_size=8)).value
    held = leave_one_out(facts, measured, structure)
    assert len(held) == 5
    assert max(abs(h.rel_error) for h in held) < 1e-8
    # a configuration with a stage kind nobody else has cannot be predicted: skipped, not guessed
    lonely = {"a": [LayerFact("stem", "conv", 8, 0, 1.0)], "b": [LayerFact("head", "fc", 8, 1, 1.0)]}
    assert leave_one_out(lonely, {"a": 1.0, "b": 1.0}, {"a": structure["c0"], "b": structure["c0"]}) == []
