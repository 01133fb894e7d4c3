"""Boundary-aware certificates (spectral.toeplitz) and the sandwich ladder, against dense SVD ground truth."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spectral.exact import operator_norm_dense
from spectral.guarantee import Guarantee
from spectral.ladder import sampling_norm
from spectral.operators import LayerOperator
from spectral.sandwich import sandwich
from spectral.toeplitz import _apply, _build, banded_certificate, banded_plan, batched_lanczos
from spectral.upper import UPPER_METHODS

LADDER = ("fft_cholesky", "axis_cholesky", "banded_cholesky")


def _op(seed, c_out, c_in, k, n, stride=1, padding=1, dilation=1, groups=1, scale=1.0, rank1=False,
        dtype=torch.float64, conv1d=False):
    g = torch.Generator().manual_seed(seed)
    kernel = (k,) if conv1d else (k, k)
    if rank1:  # every tap a multiple of one rank-1 matrix: the most ill-conditioned Gram blocks
        x, y = torch.randn(c_out, generator=g), torch.randn(c_in // groups, generator=g)
        w = x[:, None] * y[None, :]
        w = w.reshape(c_out, c_in // groups, *([1] * len(kernel))) * torch.randn(*kernel, generator=g)
    else:
        w = torch.randn(c_out, c_in // groups, *kernel, generator=g)
    shape = (c_in, n) if conv1d else (c_in, n, n)
    return LayerOperator.conv((w * scale).to(dtype), shape, stride, padding, dilation, groups)


def _dense(op):
    w = op.weight.double()
    return operator_norm_dense(LayerOperator(op.kind, w, op.in_shape, op.out_shape, op.stride, op.padding,
                                             op.dilation, op.groups, op.padding_mode)).value


@pytest.mark.parametrize("mode", ["exact", "axis"])
@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("cfg", [
    dict(c_out=3, c_in=2, k=3, n=6), dict(c_out=4, c_in=2, k=3, n=7, stride=2),
    dict(c_out=2, c_in=4, k=3, n=6, dilation=2, padding=2, groups=2), dict(c_out=3, c_in=3, k=2, n=5, padding=0),
    dict(c_out=2, c_in=3, k=5, n=6, stride=3, padding=2), dict(c_out=3, c_in=2, k=3, n=9, conv1d=True),
])
def test_banded_blocks_are_the_gram_of_the_operator(mode, side, cfg):
    op = _op(1, **cfg)
    exact = _dense(op)
    prob = _build(op, mode, 0, 0.0, side)
    R, blk, B = prob.rows, prob.block, prob.taps.shape[0]
    H = torch.zeros(B, R * blk, R * blk, dtype=prob.gamma_pairs.dtype)
    for r in range(R):
        for j in range(max(0, r - prob.band), r + 1):
            H[:, r * blk:(r + 1) * blk, j * blk:(j + 1) * blk] = prob.block_at(r, j)
            if j < r:
                H[:, j * blk:(j + 1) * blk, r * blk:(r + 1) * blk] = prob.block_at(r, j).mH
    x = torch.randn(B, R * blk, dtype=torch.float64).to(H.dtype)
    assert torch.allclose(torch.einsum("bij,bj->bi", H, x), _apply(prob, x), atol=1e-10)
    top = float(torch.linalg.eigvalsh(H)[:, -1].max().sqrt())
    if mode == "exact" or cfg.get("conv1d"):
        assert top == pytest.approx(exact, rel=1e-10)  # the true operator, boundary included
    else:
        assert top >= exact * (1 - 1e-12)  # one axis embedded in a circulant: an upper bound
    lanczos = batched_lanczos(lambda v: _apply(prob, v), R * blk, B, H.dtype, steps=R * blk)
    assert float(lanczos.max()) == pytest.approx(top ** 2, rel=1e-8)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.sampled_from([1, 2, 3]), n=st.integers(3, 7), stride=st.integers(1, 2),
       dilation=st.integers(1, 2), mode=st.sampled_from(["exact", "axis"]), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       rank1=st.booleans(), float32=st.booleans(), rho=st.sampled_from([1e-9, 1e-3]),
       target_rel=st.sampled_from([None, 0.5, 1.0]), accept_rel=st.sampled_from([None, 1.0, 1.3]))
def test_banded_certificate_is_never_below_the_dense_norm(seed, k, n, stride, dilation, mode, scale, rank1, float32,
                                                          rho, target_rel, accept_rel):
    """Round-off margin on ill-conditioned kernels: scaled by 1e-3/1e3, rank-1 taps, float32 weights, levels
    right at the true norm (rho 1e-9): the certified value is >= the float64 dense norm with no tolerance."""
    p = (dilation * (k - 1)) // 2
    if n + 2 * p < dilation * (k - 1) + 1:
        return
    op = _op(seed, 3, 2, k, n, stride, p, dilation, 1, scale, rank1, torch.float32 if float32 else torch.float64)
    exact = _dense(op)
    target = None if target_rel is None else exact * target_rel
    accept = None if accept_rel is None else exact * accept_rel
    cert = banded_certificate(op, mode=mode, target=target, rho=rho, accept=accept)
    assert cert.guarantee is Guarantee.UPPER
    assert cert.value >= exact
    if mode == "exact" and exact > 0:
        assert cert.value <= exact * (1 + rho) ** 1 * (1 + 1e-6) * (1 + rho) ** 60 + 1e-300


def test_tap_products_use_each_pair_once_and_match_the_reference():
    from spectral.toeplitz import _tap_products

    w = torch.randn(6, 4, 3, 2, dtype=torch.float64)
    for groups in (1, 2):
        taps = w.reshape(groups, 6 // groups, 4, -1).permute(0, 3, 1, 2)
        ref_in = torch.einsum("gaoi,gboj->gabij", taps, taps)
        ref_out = torch.einsum("gaoi,gbpi->gabop", taps, taps)
        assert torch.allclose(_tap_products(w, groups, "in"), ref_in, atol=1e-13)
        assert torch.allclose(_tap_products(w, groups, "out"), ref_out, atol=1e-13)


def test_axis_elements_are_certified_at_the_accepted_level_when_it_leaves_room(monkeypatch):
    """With ``accept`` above the embedding's norm, every element is certified at ``accept`` (by its circulant
    column or one banded factorisation at that level, no refined estimate): the value is ``accept`` up to the
    rigorous margin, never below the dense norm; an accept level below the embedding falls back to tight levels."""
    op = _op(3, 4, 4, 3, 6)
    exact = _dense(op)
    prob = _build(op, "axis", 0, 0.0)
    emb = float(torch.linalg.eigvalsh(_dense_gram(prob))[:, -1].max().sqrt())
    import spectral.toeplitz as toeplitz

    levels, factor = [], toeplitz._factor
    monkeypatch.setattr(toeplitz, "_factor", lambda p, mu: (levels.append(mu.clone()), factor(p, mu))[1])
    cert = banded_certificate(op, mode="axis", axis=0, twist=0.0, target=exact, rho=1e-4, accept=emb * 1.01)
    assert exact <= cert.value <= emb * 1.01 * (1 + 1e-9)
    assert cert.value >= emb * 1.01 * (1 - 1e-6) ** 0.5 * (1 - 1e-12)
    by_columns, batch = cert.details["certified_by_circulant_column"], cert.details["batch"]
    assert 0 < by_columns < batch  # some columns are not good enough: those elements were factorised at accept
    assert cert.iterations == batch - by_columns and cert.details["tries"] == 1
    assert len(levels) == 1 and torch.allclose(levels[0], torch.tensor((emb * 1.01) ** 2 * (1 - 1e-6), dtype=torch.float64))
    tight = banded_certificate(op, mode="axis", axis=0, twist=0.0, target=exact, rho=1e-4, accept=exact)
    assert emb * (1 - 1e-9) <= tight.value <= emb * (1 + 1e-4) ** 40


def _dense_gram(prob):
    R, blk = prob.rows, prob.block
    H = torch.zeros(prob.taps.shape[0], R * blk, R * blk, dtype=prob.gamma_pairs.dtype)
    for r in range(R):
        for j in range(max(0, r - prob.band), r + 1):
            H[:, r * blk:(r + 1) * blk, j * blk:(j + 1) * blk] = prob.block_at(r, j)
            if j < r:
                H[:, j * blk:(j + 1) * blk, r * blk:(r + 1) * blk] = prob.block_at(r, j).mH
    return H


def test_small_map_circulant_rung_gives_up_when_it_cannot_reach_rtol():
    """8x8 input: the circulant grid is 9x9 (1.27x the input); its sampled estimate already exceeds
    lower (1 + rtol), so no frequency block is factorised and the one-axis / banded rungs take over."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, 3, 3, generator=g, dtype=torch.float64) / 12
    res = sandwich(w, (16, 8, 8), rtol=0.005, padding=1, dense_max_entries=0)
    fft = [s for s in res.steps if s["step"] == "fft_cholesky"]
    assert len(fft) == 1 and fft[0]["gave_up"] and fft[0]["value"] == math.inf
    assert res.upper.method in ("axis_cholesky", "banded_cholesky") and res.converged
    exact = _dense(LayerOperator.conv(w, (16, 8, 8), 1, 1))
    assert res.lower.value <= exact <= res.upper.value <= res.lower.value * 1.005


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), c=st.sampled_from([8, 12, 16]), n=st.integers(5, 8), stride=st.integers(1, 2),
       float32=st.booleans(), rtol=st.sampled_from([0.005, 0.02]))
def test_small_map_ladder_brackets_the_dense_norm(seed, c, n, stride, float32, rtol):
    """The small-map order (lower bound inside the circulant rung, which may give up) on float32 and float64
    layers: lower <= dense SVD <= upper with no tolerance, the upper bound finite whatever rung ends it."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(c, c, 3, 3, generator=g, dtype=torch.float64) / (3 * c ** 0.5)).to(
        torch.float32 if float32 else torch.float64)
    res = sandwich(w, (c, n, n), rtol=rtol, stride=stride, padding=1, dense_max_entries=0)
    exact = _dense(LayerOperator.conv(w, (c, n, n), stride, 1))
    assert res.lower.value <= exact * (1 + 1e-12) and exact <= res.upper.value < math.inf


def test_a_circulant_rung_that_gave_up_is_certified_when_no_later_rung_can_run(monkeypatch):
    import spectral.ladder as ladder

    give_up = ladder._fft_or_give_up

    def and_run_out_of_budget(run, rho):
        out = give_up(run, rho)
        run.budget = -1.0  # the budget runs out right after: no later rung may start
        return out

    monkeypatch.setattr(ladder, "_fft_or_give_up", and_run_out_of_budget)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, 3, 3, generator=g, dtype=torch.float64) / 12
    res = sandwich(w, (16, 8, 8), rtol=0.005, padding=1, dense_max_entries=0)
    steps = [s["step"] for s in res.steps]
    assert steps.count("fft_cholesky") == 2 and not any(s in steps for s in ("axis_cholesky", "banded_cholesky"))
    assert res.upper.method == "fft_cholesky" and math.isfinite(res.upper.value)
    assert res.upper.value >= _dense(LayerOperator.conv(w, (16, 8, 8), 1, 1))
    assert not res.converged and "budget" in res.suggestion


def test_fourier_certificate_give_up_level_fixed_or_from_the_estimate():
    from spectral.circulant import fourier_certificate

    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    full = fourier_certificate(w, (6, 6), rho=1e-3)
    gave_up = fourier_certificate(w, (6, 6), rho=1e-3, give_up_above=full.value / 2)
    assert gave_up.value == math.inf and gave_up.details["gave_up"] and gave_up.iterations == 0
    assert gave_up.details["circulant_lower"] <= full.value
    seen = []
    kept = fourier_certificate(w, (6, 6), rho=1e-3, give_up_above=lambda est: seen.append(est) or full.value * 2)
    assert kept.value == pytest.approx(full.value) and "gave_up" not in kept.details
    assert seen and {"circulant_lower", "argmax_frequency", "argmax_vector", "coarse_grid"} <= set(seen[0])


def test_exact_mode_is_tight_where_the_circulant_is_not():
    # 4x4 input, a smoothing (low-frequency) kernel: the circulant embedding is far above the true norm
    torch.manual_seed(0)
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64) * 0.2 + torch.ones(8, 8, 3, 3, dtype=torch.float64) / 8
    op = LayerOperator.conv(w, (8, 4, 4), 1, 1)
    exact = _dense(op)
    old = sandwich(w, (8, 4, 4), rtol=0.01, padding=1, dense_max_entries=0, strategy="circulant")
    new = sandwich(w, (8, 4, 4), rtol=0.01, padding=1, dense_max_entries=0)
    assert old.gap > 0.05 and not old.converged and "fft_cholesky bounds an embedding" in old.reason
    assert "banded_cholesky" in old.suggestion or "axis_cholesky" in old.suggestion
    assert new.converged and new.gap <= 0.01 and new.reason is None and new.suggestion is None
    assert new.lower.value <= exact <= new.upper.value
    cert = banded_certificate(op, mode="exact", target=exact, rho=1e-3)
    assert exact <= cert.value <= exact * 1.001 * (1 + 1e-9)


def test_plan_costs_scale_as_documented():
    small = banded_plan(_op(0, 8, 8, 3, 4), "exact")
    big = banded_plan(_op(0, 8, 8, 3, 8), "exact")
    assert small["rows"] == 4 and big["rows"] == 8 and big["block"] == 2 * small["block"]
    assert big["flops"] > 8 * small["flops"]
    axis = banded_plan(_op(0, 8, 8, 3, 8), "axis")
    assert axis["block"] == 8 and axis["batch"] == 5 and axis["flops"] < big["flops"]
    with pytest.raises(ValueError, match="banded mode"):
        banded_plan(_op(0, 2, 2, 3, 4), "nope")
    with pytest.raises(ValueError, match="zero-padded"):
        banded_certificate(LayerOperator.conv(torch.randn(2, 2, 3, 3), (2, 5, 5), 1, 1, padding_mode="reflect"))


# ----------------------------------------------------------------------------------------------- exact values
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("stride,padding,n", [(1, 0, 5), (2, 0, 7), (2, 1, 6), (3, 2, 5), (1, 1, 4)])
def test_pointwise_convs_are_exact(mode, stride, padding, n):
    g = torch.Generator().manual_seed(stride * 10 + padding)
    for groups in (1, 2):
        w = torch.randn(4, 4 // groups, 1, 1, generator=g).float()
        op = LayerOperator.conv(w, (4, n, n), stride, padding, 1, groups, mode)
        s = sandwich(w, (4, n, n), stride=stride, padding=padding, padding_mode=mode, groups=groups,
                     dense_max_entries=0)
        assert s.exact is not None and s.exact.method == "pointwise" and s.gap == 0.0
        ref = _dense(op)
        assert abs(s.exact.value - ref) <= s.exact.details["error_bound"] + 1e-12 * ref
        assert sampling_norm(op) >= 1.0 or ref == 0.0


@pytest.mark.parametrize("groups,c_out", [(2, 4), (4, 4), (4, 8)])  # grouped, depthwise, depthwise x2
def test_grouped_and_depthwise_convs_are_exact_when_small(groups, c_out):
    torch.manual_seed(groups)
    conv = nn.Conv2d(4, c_out, 3, padding=1, groups=groups, bias=False)
    op = LayerOperator.from_module(conv, (4, 6, 6))
    s = sandwich(conv, (4, 6, 6), dense_max_entries=6 * 6 * 4 * 6 * 6 * c_out // groups ** 2)
    assert s.exact is not None and s.exact.method == "dense_svd_groups"
    assert s.exact.value == pytest.approx(_dense(op), rel=1e-10)
    big = sandwich(conv, (4, 6, 6), dense_max_entries=0, rtol=0.01)  # too big for dense: the ladder
    assert big.converged and big.lower.value <= _dense(op) <= big.upper.value


def test_linear_exact_states_its_error():
    s = sandwich(nn.Linear(7, 5), (7,))
    assert s.exact.method == "svd_weight" and 0 < s.exact.details["error_bound"] < 1e-12


# ----------------------------------------------------------------------------------------------- the ladder
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.sampled_from([1, 2, 3]), n=st.integers(3, 6), stride=st.integers(1, 2),
       pad=st.integers(0, 1), mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
       method=st.sampled_from(["auto", *LADDER, *sorted(UPPER_METHODS)]), float32=st.booleans(),
       strategy=st.sampled_from(["boundary", "circulant"]), cert32=st.booleans())
def test_every_path_brackets_the_dense_norm(seed, k, n, stride, pad, mode, method, float32, strategy, cert32):
    if k == 1 and method == "auto":
        pad = 0
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 2, k, k, generator=g)
    w = w.float() if float32 else w.double()
    try:
        op = LayerOperator.conv(w, (2, n, n), stride, pad, 1, 1, mode)
    except ValueError:
        return
    exact = _dense(op)
    from spectral.ladder import zero_padded_view

    if method in LADDER[1:] and zero_padded_view(op) is None and k > 1:  # (1x1 kernels are exact first)
        with pytest.raises(ValueError, match="circulant"):
            sandwich(w, (2, n, n), stride=stride, padding=pad, padding_mode=mode, upper_method=method,
                     dense_max_entries=0, fft_svd_max_flops=0)
        return
    s = sandwich(w, (2, n, n), rtol=0.01, stride=stride, padding=pad, padding_mode=mode, upper_method=method,
                 strategy=strategy, dense_max_entries=0, fft_svd_max_flops=0,
                 certificate_dtype=torch.float32 if cert32 else torch.float64)
    assert s.lower.value <= exact * (1 + 1e-12)
    if s.exact is None:  # certified values: no tolerance (exact values state their round-off instead)
        assert s.upper.value >= exact
    else:
        assert abs(s.exact.value - exact) <= s.exact.details["error_bound"] + 1e-12 * exact
    assert (s.reason is None) == s.converged and (s.suggestion is None) == s.converged
    if s.exact is None:
        assert s.upper.guarantee is Guarantee.UPPER and s.lower.guarantee is Guarantee.LOWER


def test_budget_too_small_says_what_would_reach_rtol():
    torch.manual_seed(3)
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64) * 0.1 + 0.05
    s = sandwich(w, (16, 4, 4), rtol=0.01, padding=1, dense_max_entries=0, budget_seconds=1e-6)
    assert not s.converged and s.gap > 0.01
    assert "budget_seconds" in s.suggestion and s.reason
    d = s.to_dict()
    assert d["converged"] is False and d["reason"] == s.reason and d["suggestion"] == s.suggestion
    ok = sandwich(w, (16, 4, 4), rtol=0.01, padding=1, dense_max_entries=0)
    assert ok.converged and ok.layer["plan"]["ladder"][0] in LADDER


def test_plan_records_estimates_and_the_ladder():
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    s = sandwich(w, (8, 8, 8), rtol=0.01, padding=1, dense_max_entries=0)
    plan = s.layer["plan"]
    assert set(plan["estimated_seconds"]) == set(LADDER)
    assert plan["chosen_upper"] == plan["ladder"][0]
    assert s.layer["strategy"] == "boundary"
    with pytest.raises(ValueError, match="strategy"):
        sandwich(w, (8, 8, 8), strategy="fast")
    with pytest.raises(ValueError, match="rho_fraction"):
        sandwich(w, (8, 8, 8), rho_fraction=2.0)


def test_float32_layer_lower_bound_is_evaluated_in_float64():
    torch.manual_seed(5)
    w = torch.randn(6, 6, 3, 3)
    s = sandwich(w, (6, 5, 5), padding=1, dense_max_entries=0)
    assert s.lower.details.get("evaluated_in") == "float64"
    assert s.lower.value <= _dense(LayerOperator.conv(w, (6, 5, 5), 1, 1))
    assert math.isfinite(s.upper.value)
