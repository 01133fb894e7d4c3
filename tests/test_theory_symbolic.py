"""Closed-form parameter counts, MACs and the symbolic bound against built models and measured norms."""
from __future__ import annotations

import math

import pytest
import sympy as sp
import torch

from experiments.models import WideResNet, create_model, describe
from lipschitz.theory import symbolic
from spectral.guarantee import Guarantee


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,expected_millions", [("wrn-34-10", 46.16), ("wrn-34-r", 68.12), ("wrn-34-12", 66.46),
                                                    ("wrn-28-10", 36.48)])
def test_param_count_of_paper_models(name, expected_millions):
    with torch.device("meta"):
        model = create_model(name)
    p = symbolic.param_count(model.depths, model.widths, strides=model.strides)
    assert p == _count(model)
    assert round(p / 1e6, 2) == expected_millions


@pytest.mark.parametrize("depths,widths,strides,in_ch,classes", [
    ((1, 1, 1), (8, 16, 32, 64), (1, 2, 2), 1, 10),
    ((2, 3, 1), (16, 16, 40, 24), (1, 2, 2), 3, 100),   # stage 1 without projection
    ((1, 2), (4, 4, 8), (1, 1), 3, 7),                   # two stages, stage 2 stride 1 with projection
    ((3, 1, 2, 1), (8, 12, 12, 20, 20), (1, 1, 2, 1), 2, 10),  # stride-1 equal widths: no projection
])
def test_param_count_and_macs_match_built_models(depths, widths, strides, in_ch, classes):
    model = WideResNet(depths=depths, widths=widths, strides=strides, num_classes=classes, in_channels=in_ch)
    assert symbolic.param_count(depths, widths, num_classes=classes, in_channels=in_ch, strides=strides) == _count(model)
    size = 8 * math.prod(strides)
    desc = describe(model, (in_ch, size, size))
    assert symbolic.macs(depths, widths, input_size=size, num_classes=classes, in_channels=in_ch,
                         strides=strides) == desc.total_macs


def test_param_count_expression_is_polynomial_in_depth_and_width():
    s = symbolic.wrn_symbols(3)
    expr = symbolic.param_count_expr(symbols=s)
    poly = sp.Poly(expr, *s.depths, *s.widths)
    assert poly.total_degree() == 3  # D_i * W_i^2
    assert sp.degree(expr, s.widths[3]) == 2 and sp.degree(expr, s.depths[0]) == 1


def test_symbolic_bound_matches_manual_composition():
    # fixed-variance weights, strides 1 only -> every layer law is std*k*(sqrt(c_in)+sqrt(c_out))
    std, g, S = 0.03, 0.9, 8
    depths, widths = (2, 1), (8, 16, 16)
    rho = lambda co, ci, k=3: std * k * (math.sqrt(co) + math.sqrt(ci))  # noqa: E731
    stem = rho(8, 3)
    st1 = g * (rho(16, 8, 1) + rho(16, 8) * g * rho(16, 16)) * (1 + g * g * rho(16, 16) ** 2)
    st2 = 1 + g * g * rho(16, 16) ** 2
    head = g / S * rho(10, 16, 1)
    nb = symbolic.lipschitz_bound(depths, widths, weight_model="fixed", std=std, bn_gain=g, input_size=S,
                                  strides=(1, 1))
    assert nb.guarantee is Guarantee.ESTIMATE
    assert nb.details["stages"] == pytest.approx([st1, st2])
    assert nb.value == pytest.approx(stem * st1 * st2 * head, rel=1e-9)


def test_symbolic_bound_close_to_measured_product_at_init():
    """Symbolic bound (leading-order laws) vs the product of exact circular layer norms of a built model."""
    from experiments.theory_validation import _layer_input_shapes, _layer_rows, compose_bound
    from lipschitz.trace import graph_from_module

    torch.manual_seed(0)
    depths, widths, size = (1, 1, 1), (16, 32, 64, 64), 8
    model = WideResNet(depths=depths, widths=widths, num_classes=10).eval()
    shapes = _layer_input_shapes(model, (3, size, size))
    rows = _layer_rows(model, shapes)
    parts: dict = {}
    measured = compose_bound(graph_from_module(model, (3, size, size)), lambda m: rows[id(m)]["measured"], shapes, parts)
    sym = symbolic.lipschitz_bound(depths, widths, weight_model="kaiming_normal_fan_out",
                                   bn_gain=1 / math.sqrt(1 + 1e-5), input_size=size)
    assert abs(math.log(sym.value / measured)) < math.log(1.25)
    for pred, meas in zip(sym.details["stages"], [parts[f"stage{i}"] for i in (1, 2, 3)]):
        assert abs(math.log(pred / meas)) < math.log(1.15)


def test_regimes_predict_opposite_last_stage_trends():
    base, reduced = (16, 320, 640, 640), (16, 320, 640, 512)
    fixed = [symbolic.lipschitz_bound((5, 5, 5), w, weight_model="fixed", std=0.02).value for w in (base, reduced)]
    fan_in = [symbolic.lipschitz_bound((5, 5, 5), w, weight_model="kaiming_normal_fan_in").value for w in (base, reduced)]
    fan_out = [symbolic.lipschitz_bound((5, 5, 5), w, weight_model="kaiming_normal_fan_out").value
               for w in (base, reduced)]
    assert fixed[1] < fixed[0] * 0.6      # fixed variance: width enters like sqrt(W); shrinking helps a lot
    assert fan_in[1] < fan_in[0]          # fan-in: only the transition ratio sqrt(c_out/c_in) changes
    assert fan_out[1] > fan_out[0]        # fan-out: the ratio flips, shrinking slightly raises the bound


def test_bad_configurations_raise():
    with pytest.raises(ValueError, match="stem width plus one per stage"):
        symbolic.param_count((5, 5, 5), (16, 160, 320))
    with pytest.raises(ValueError, match="positive integers"):
        symbolic.param_count((5, 0, 5), (16, 160, 320, 640))
    with pytest.raises(ValueError, match="needs std"):
        symbolic.lipschitz_bound((1, 1, 1), (8, 8, 8, 8), weight_model="fixed")
    with pytest.raises(ValueError, match="valid: kaiming_normal_fan_out"):
        symbolic.lipschitz_bound((1, 1, 1), (8, 8, 8, 8), weight_model="orthogonal")
    with pytest.raises(ValueError, match="divisible by the total stride"):
        symbolic.macs((1, 1, 1), (8, 8, 8, 8), input_size=6)
