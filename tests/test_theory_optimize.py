"""optimal_config against brute force on tiny budgets."""
from __future__ import annotations

import itertools
import math

import pytest
import sympy as sp

from lipschitz.theory import optimal_config, symbolic


def _params(depths, widths, classes, in_ch, strides):
    """Independent plain-Python parameter count of the pre-activation WRN."""
    p = in_ch * widths[0] * 9
    for i, d in enumerate(depths):
        a, b = widths[i], widths[i + 1]
        proj = a != b or strides[i] != 1
        p += 2 * a + 9 * a * b + 2 * b + 9 * b * b + (a * b if proj else 0) + (d - 1) * (4 * b + 18 * b * b)
    return p + 2 * widths[-1] + widths[-1] * classes + classes


def _log_bound_fixed(depths, widths, std, size, classes, in_ch, strides):
    """Independent plain-Python log of the fixed-variance product bound (BN gain 1)."""
    def rho(co, ci, k, s):
        r = min(k, s)
        return std * k / r * (math.sqrt(co) + r * math.sqrt(ci))
    total = math.log(rho(widths[0], in_ch, 3, 1))
    for i, d in enumerate(depths):
        a, b = widths[i], widths[i + 1]
        branch = rho(b, a, 3, strides[i]) * rho(b, b, 3, 1)
        first = rho(b, a, 1, strides[i]) + branch if (a != b or strides[i] != 1) else 1 + branch
        total += math.log(first) + (d - 1) * math.log(1 + rho(b, b, 3, 1) ** 2)
    return total + math.log(math.prod(strides) / size * rho(classes, widths[-1], 1, 1))


TINY = dict(n_stages=3, weight_model="fixed", std=0.05, stem_width=4, num_classes=10, in_channels=1, input_size=8,
            depth_range=(1, 3), width_range=(4, 24), width_step=4, min_fraction=0.6)


def _brute_force(budget, objective):
    strides = (1, 2, 2)
    best = []
    for d in itertools.product(range(1, 4), repeat=3):
        for w in itertools.product(range(4, 25, 4), repeat=3):
            widths = (4, *w)
            p = _params(d, widths, 10, 1, strides)
            if TINY["min_fraction"] * budget <= p <= budget:
                best.append((objective(d, widths), p, d, widths))
    best.sort()
    return best


@pytest.mark.parametrize("budget", [12_000, 30_000])
def test_default_objective_agrees_with_brute_force(budget):
    search = optimal_config(budget, **TINY)
    brute = _brute_force(budget, lambda d, w: _log_bound_fixed(d, w, 0.05, 8, 10, 1, (1, 2, 2)))
    top = search[0]
    assert top.params == _params(top.depths, top.widths, 10, 1, (1, 2, 2)) <= budget
    assert top.objective == pytest.approx(brute[0][0], rel=1e-9)
    assert (top.depths, top.widths) == (brute[0][2], brute[0][3])
    assert top.bound == pytest.approx(math.exp(top.objective))
    assert [c.objective for c in search] == sorted(c.objective for c in search)
    assert search.relaxation["success"] and "lambda" in search.relaxation["lagrangian"]


def test_callable_and_sympy_objectives_agree_with_brute_force():
    def objective(d, w):
        return (sum(d) - 5) ** 2 + 0.01 * (w[3] - 2 * w[1]) ** 2 + 0.001 * w[2]

    budget = 25_000
    brute = _brute_force(budget, objective)
    result = optimal_config(budget, objective, **TINY)
    assert result[0].objective == pytest.approx(brute[0][0])
    s = symbolic.wrn_symbols(3)
    expr = (sum(s.depths) - 5) ** 2 + sp.Rational(1, 100) * (s.widths[3] - 2 * s.widths[1]) ** 2 + \
        sp.Rational(1, 1000) * s.widths[2]
    result_sym = optimal_config(budget, expr, **TINY)
    assert result_sym[0].objective == pytest.approx(brute[0][0])


def test_kkt_multiplier_reported_and_budget_respected():
    search = optimal_config(5_000_000, weight_model="kaiming_normal_fan_in", depth_range=(5, 5), top_k=3)
    assert all(c.params <= 5_000_000 and c.depths == (5, 5, 5) for c in search)
    rel = search.relaxation
    assert rel["params"] <= 5_000_000 * (1 + 1e-6)
    if "multiplier" in rel:
        assert rel["kkt_residual"] < 1e-3 * (1 + abs(rel["multiplier"]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="budget must be a positive integer"):
        optimal_config(-5)
    with pytest.raises(TypeError, match="objective must be"):
        optimal_config(10_000, objective="min")
    with pytest.raises(ValueError, match="unknown symbols"):
        optimal_config(10_000, objective=sp.Symbol("Q") + 1, **TINY)
    with pytest.raises(ValueError, match="min_fraction"):
        optimal_config(10_000, min_fraction=1.5)
