"""Certified upper bounds: never below the exact norm (dense SVD), tight where claimed, stable in float32."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from spectral.exact import conv_operator_norm_circular, operator_norm_dense
from spectral.guarantee import Guarantee
from spectral.operators import LayerOperator
from spectral.upper import (
    UPPER_METHODS,
    bernstein_factor,
    conv_operator_norm_upper,
    embedding,
    linear_operator_norm_upper,
    padding_map_norm,
    zero_padding_grid,
)

DT = torch.float64


def _exact(w, shape, **kw):
    return operator_norm_dense(LayerOperator.conv(w, shape, **kw)).value


CASES = list(
    itertools.product(["zeros", "circular", "reflect", "replicate"], [1, 2], [1, 2], [1, 2], [1, 2], [2, 3])
) + [("zeros", 1, 1, 1, 0, 3), ("zeros", 3, 1, 1, 0, 2)]


@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect", "replicate"])
def test_every_method_is_above_the_dense_norm_on_all_layer_kinds(mode):
    g = torch.Generator().manual_seed(1)
    for case in CASES:
        if case[0] != mode:
            continue
        _, stride, dilation, groups, padding, k = case
        w = torch.randn(4, 4 // groups, k, k, generator=g, dtype=DT)
        kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=mode)
        exact = _exact(w, (4, 6, 5), **kw)
        for method in UPPER_METHODS:
            ub = conv_operator_norm_upper(w, (6, 5), method=method, **kw)
            assert ub.guarantee is Guarantee.UPPER
            assert ub.value >= exact * (1 - 1e-12), (method, case, ub.value, exact)


def test_conv1d_bounds():
    w = torch.randn(3, 2, 3, dtype=DT)
    for mode in ["zeros", "circular", "reflect", "replicate"]:
        exact = _exact(w, (2, 9), padding=1, padding_mode=mode, stride=2)
        for method in UPPER_METHODS:
            ub = conv_operator_norm_upper(w, 9, padding=1, padding_mode=mode, stride=2, method=method)
            assert ub.value >= exact * (1 - 1e-12)


def test_gram_is_exact_for_circular_and_non_increasing_in_iterations():
    w = torch.randn(6, 5, 3, 3, dtype=DT)
    exact = conv_operator_norm_circular(w, 8).value
    values = [conv_operator_norm_upper(w, 8, padding=1, padding_mode="circular", n_iter=t, prune=False).value
              for t in range(0, 12)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(values, values[1:])), values
    assert all(v >= exact * (1 - 1e-12) for v in values)
    assert values[-1] <= exact * (1 + 1e-6)
    pruned = [conv_operator_norm_upper(w, 8, padding=1, padding_mode="circular", n_iter=t).value for t in range(12)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(pruned, pruned[1:]))
    assert all(p >= exact * (1 - 1e-12) for p in pruned)


def test_gram_strided_polyphase_is_exact_for_circular():
    w = torch.randn(4, 3, 3, 3, dtype=DT)
    op = LayerOperator.conv(w, (3, 8, 8), stride=2, padding=1, padding_mode="circular")
    exact = operator_norm_dense(op).value
    ub = conv_operator_norm_upper(w, 8, stride=2, padding=1, padding_mode="circular", n_iter=12)
    assert ub.details["route"] == "circular"
    assert exact * (1 - 1e-12) <= ub.value <= exact * (1 + 1e-6)


def test_float32_large_kernel_no_overflow_matches_float64():
    w64 = torch.randn(16, 16, 3, 3, dtype=DT) * 1e3
    ref = conv_operator_norm_upper(w64, 8, padding=1, n_iter=10).value
    val = conv_operator_norm_upper(w64.float(), 8, padding=1, n_iter=10).value
    assert math.isfinite(val)
    assert abs(val / ref - 1) < 1e-4
    lin = linear_operator_norm_upper(torch.randn(50, 40) * 1e3, n_iter=20)
    assert math.isfinite(lin.value)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.sampled_from([1, 2, 3, 5]), n=st.integers(3, 7),
       c_in=st.integers(1, 3), c_out=st.integers(1, 3))
def test_circulant_on_larger_grid_dominates_zero_padding(seed, k, n, c_in, c_out):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c_out, c_in, k, k, generator=g, dtype=DT)
    p = (k - 1) // 2
    zero = _exact(w, (c_in, n, n), padding=p)
    assert conv_operator_norm_circular(w, n + k - 1).value >= zero * (1 - 1e-12)
    N = zero_padding_grid(n, k, 1, 1, p, p)
    assert N <= n + k - 1
    assert conv_operator_norm_circular(w, N).value >= zero * (1 - 1e-12)


def test_zero_padding_grid_strided_submatrix():
    # stride 2, padding 1, n = 7: grid must be even and hold every tap
    N = zero_padding_grid(7, 3, 2, 1, 1, 1)
    assert N % 2 == 0 and N >= 8
    for seed in range(5):
        w = torch.randn(3, 2, 3, 3, dtype=DT, generator=torch.Generator().manual_seed(seed))
        assert conv_operator_norm_circular(w, N, stride=2).value >= _exact(w, (2, 7, 7), stride=2, padding=1) * (1 - 1e-12)


def test_padding_map_norm_matches_dense():
    for mode, n, pl, pr in [("reflect", 5, 1, 1), ("reflect", 3, 2, 2), ("replicate", 4, 2, 1), ("circular", 4, 3, 1)]:
        basis = torch.eye(n, dtype=DT).view(n, 1, n)
        P = torch.nn.functional.pad(basis, [pl, pr], mode=mode).view(n, -1).T
        assert abs(padding_map_norm(n, pl, pr, mode) - torch.linalg.matrix_norm(P, 2).item()) < 1e-12


def test_gram_tight_on_zero_padding_and_singla_feizi_looser():
    w = torch.randn(8, 8, 3, 3, dtype=DT)
    exact = _exact(w, (8, 8, 8), padding=1)
    gram = conv_operator_norm_upper(w, 8, padding=1, n_iter=10).value
    sf = conv_operator_norm_upper(w, 8, padding=1, method="singla_feizi").value
    sym = conv_operator_norm_upper(w, 8, padding=1, method="symbol").value
    assert exact <= gram <= exact * 1.10
    assert gram <= sym and gram <= sf
    assert conv_operator_norm_upper(w, 64, padding=1, method="symbol").value == pytest.approx(sym)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 12))
def test_symbol_bound_holds_for_every_input_size(seed, n):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=DT)
    sym = conv_operator_norm_upper(w, 4, padding=1, method="symbol", grid=16).value
    assert sym >= conv_operator_norm_circular(w, n).value * (1 - 1e-12)
    assert sym >= _exact(w, (2, n, n), padding=1) * (1 - 1e-12)


def test_bernstein_factor_and_errors():
    assert bernstein_factor((2, 2), (64, 64)) < 1.02
    with pytest.raises(ValueError, match="coarse"):
        bernstein_factor((2, 2), (4, 4))
    w = torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match="gram, singla_feizi"):
        conv_operator_norm_upper(w, 8, method="power")
    with pytest.raises(ValueError, match="padding_mode"):
        conv_operator_norm_upper(w, 8, padding_mode="mirror")
    with pytest.raises(ValueError, match="n_iter"):
        conv_operator_norm_upper(w, 8, method="frobenius", n_iter=3)
    with pytest.raises(TypeError, match="float32 or float64"):
        conv_operator_norm_upper(w.half(), 8)


def test_linear_gram_bound():
    W = torch.randn(30, 20, dtype=DT)
    exact = torch.linalg.matrix_norm(W, 2).item()
    vals = [linear_operator_norm_upper(W, n_iter=t).value for t in range(0, 10)]
    assert all(v >= exact * (1 - 1e-12) for v in vals)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(vals, vals[1:]))
    assert vals[-1] <= exact * (1 + 1e-8)
    assert linear_operator_norm_upper(torch.zeros(3, 4)).value == 0.0


def test_embedding_routes():
    w = torch.randn(2, 2, 3, 3)
    assert embedding(w, 8, padding=1, padding_mode="circular").route == "circular"
    assert embedding(w, 8, padding=1).grid == (9, 9)
    assert embedding(w, 8, padding=1, padding_mode="reflect").route == "valid_times_padding_norm"
    assert embedding(w, 8, padding=1, padding_mode="reflect").pad_norm == pytest.approx(2.0)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    mode=st.sampled_from(["zeros", "circular", "reflect", "replicate"]),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    k=st.integers(1, 3),
    n=st.integers(4, 7),
    method=st.sampled_from(sorted(UPPER_METHODS)),
)
def test_property_upper_above_exact_above_lower(seed, mode, stride, dilation, padding, k, n, method):
    from spectral.lower import operator_norm_lower

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 2, k, k, generator=g, dtype=DT)
    kw = dict(stride=stride, padding=padding, dilation=dilation, padding_mode=mode)
    try:
        op = LayerOperator.conv(w, (2, n, n), **kw)
    except ValueError:
        return
    exact = operator_norm_dense(op).value
    lower = operator_norm_lower(op, method="lanczos", max_iter=20, seed=seed).value
    upper = conv_operator_norm_upper(w, n, method=method, **kw).value
    assert upper >= exact * (1 - 1e-12) and exact >= lower * (1 - 1e-12)


def test_gram_tol_stops_early_and_stays_certified():
    w = torch.randn(8, 8, 3, 3, dtype=DT)
    exact = _exact(w, (8, 6, 6), padding=1)
    full = conv_operator_norm_upper(w, 6, padding=1, n_iter=12)
    early = conv_operator_norm_upper(w, 6, padding=1, n_iter=12, tol=0.05)
    assert exact * (1 - 1e-12) <= full.value <= early.value
    assert early.value <= early.details["circulant_lower"] * 1.05 * (1 + 1e-12)
