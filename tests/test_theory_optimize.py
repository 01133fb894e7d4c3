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
            depth_range=(1, 3), width_range=(4, 24), width_step=4, min_fraction=0.6, monotone_widths=False,
            max_width_ratio=None)


def _brute_force(budget, objective, depths=range(1, 4), keep=lambda w: True):
    strides = (1, 2, 2)
    best = []
    for d in itertools.product(depths, repeat=3):
        for w in itertools.product(range(4, 25, 4), repeat=3):
            widths = (4, *w)
            p = _params(d, widths, 10, 1, strides)
            if TINY["min_fraction"] * budget <= p <= budget and keep(w):
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
    with pytest.raises(ValueError, match="max_width_ratio"):
        optimal_config(10_000, max_width_ratio=0.5, **{k: v for k, v in TINY.items() if k != "max_width_ratio"})


def _log_bound(d, w):
    return _log_bound_fixed(d, w, 0.05, 8, 10, 1, (1, 2, 2))


@pytest.mark.parametrize("budget", [20_000, 30_000])
def test_monotone_widths_and_ratio_limit_agree_with_brute_force(budget):
    """The default design space (>= 2 blocks, non-decreasing widths, each stage <= 2x here) against brute force."""
    space = {**TINY, "depth_range": (2, 3), "monotone_widths": True, "max_width_ratio": 2.0}
    search = optimal_config(budget, **space)
    brute = _brute_force(budget, _log_bound, depths=range(2, 4),
                         keep=lambda w: all(a <= b <= 2 * a for a, b in zip(w, w[1:])))
    assert (search[0].depths, search[0].widths) == (brute[0][2], brute[0][3])
    assert search[0].objective == pytest.approx(brute[0][0], rel=1e-9)
    for c in search:
        assert min(c.depths) >= 2 and all(a <= b <= 2 * a for a, b in zip(c.widths[1:], c.widths[2:]))
    assert search.space["monotone_widths"] and search.space["max_width_ratio"] == 2.0
    assert "fixed" in search.objective and "0.05" in search.objective


def test_default_space_at_68m_and_references_at_the_same_budget():
    from lipschitz.theory import reference_configs, scale_to_budget, symbolic

    budget = 68_000_000
    widths, factor = scale_to_budget((5, 5, 5), (16, 160, 320, 640), budget)
    assert symbolic.param_count((5, 5, 5), widths) <= budget
    bigger = (16, *(w + 16 for w in widths[1:]))
    assert symbolic.param_count((5, 5, 5), bigger) > budget and factor == pytest.approx(1.2, abs=0.05)
    search = optimal_config(budget, top_k=3)
    for c in search:  # not the old answer (one block per stage, a 2048-wide stage): the stated default space
        assert min(c.depths) >= 2 and max(c.widths) <= 1024
        assert all(a <= b <= 4 * a for a, b in zip(c.widths[1:], c.widths[2:]))
        assert 0.9 * budget <= c.params <= budget
    refs = reference_configs({"WRN-34-10": ((5, 5, 5), (16, 160, 320, 640)),
                              "WRN-34-R": ((5, 5, 5), (16, 320, 640, 512))}, search, budget)
    by_name = {r.name: r for r in refs}
    assert by_name["WRN-34-R"].params == 68_116_698 and not by_name["WRN-34-R"].in_space
    assert "over budget" in by_name["WRN-34-R"].note and "non-decreasing" in by_name["WRN-34-R"].note
    assert "below" in by_name["WRN-34-10"].note
    scaled = [r for r in refs if r.name.startswith("WRN-34-10 x")]
    assert scaled and scaled[0].in_space and scaled[0].widths == widths
    expected = math.log(symbolic.lipschitz_bound((5, 5, 5), (16, 320, 640, 512), weight_model="fixed",
                                                 std=0.05).value)
    assert by_name["WRN-34-R"].objective == pytest.approx(expected)
    # the search's best beats every reference under the objective it minimises
    assert all(search[0].objective <= r.objective for r in refs if r.in_space)


def test_cli_states_objective_space_and_references(capsys):
    from experiments.cli import main

    assert main(["theory", "optimal-config", "--budget", "2M", "--top", "2", "--depth-range", "2-4"]) == 0
    out = capsys.readouterr().out
    assert "minimises: log of the predicted Lipschitz bound" in out and "'fixed' weight model" in out
    assert "2-4 blocks each" in out and "non-decreasing" in out and "at most 4x" in out
    assert "WRN-34-10" in out and "WRN-34-R" in out and "over budget" in out
    assert main(["theory", "optimal-config", "--budget", "2M", "--depth-range", "5-2"]) == 2
    assert "depth range" in capsys.readouterr().err
