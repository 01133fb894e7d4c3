"""Lower bounds: power iteration and Lanczos never exceed the exact norm and converge to it."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from spectral.exact import operator_norm_dense
from spectral.guarantee import Guarantee
from spectral.lower import operator_norm_lower
from spectral.operators import LayerOperator

DT = torch.float64


def _op(seed, mode="zeros", stride=1, c=4, n=7):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, c, 3, 3, generator=g, dtype=DT)
    return LayerOperator.conv(w, (c, n, n), stride=stride, padding=1, padding_mode=mode)


@pytest.mark.parametrize("method", ["power", "lanczos"])
@pytest.mark.parametrize("mode,stride", [("zeros", 1), ("reflect", 2), ("circular", 1), ("replicate", 1)])
def test_lower_bound_below_and_close_to_exact(method, mode, stride):
    op = _op(0, mode, stride)
    exact = operator_norm_dense(op).value
    tol, max_iter, close = (1e-8, 400, 2e-3) if method == "power" else (1e-10, 400, 1e-6)
    nv = operator_norm_lower(op, method=method, tol=tol, max_iter=max_iter)
    assert nv.guarantee is Guarantee.LOWER
    assert nv.value <= exact * (1 + 1e-12)
    assert nv.value >= exact * (1 - close), (nv.value, exact, nv.iterations)
    v = nv.details["vector"]
    assert v.shape == op.in_shape
    # the value is a true quotient ||A v|| / ||v||
    q = torch.linalg.vector_norm(op.forward(v[None])) / torch.linalg.vector_norm(v)
    assert abs(q.item() - nv.value) < 1e-12 * exact


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), iters=st.integers(1, 30), method=st.sampled_from(["power", "lanczos"]))
def test_lower_never_exceeds_exact_even_unconverged(seed, iters, method):
    op = _op(seed, c=3, n=5)
    exact = operator_norm_dense(op).value
    nv = operator_norm_lower(op, method=method, tol=1e-12, max_iter=iters, seed=seed)
    assert nv.value <= exact * (1 + 1e-12)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), stall=st.sampled_from([1e-2, 1e-4, 1e-6]))
def test_lanczos_stall_stops_early_and_stays_a_lower_bound(seed, stall):
    op = _op(seed, c=3, n=6)
    exact = operator_norm_dense(op).value
    full = operator_norm_lower(op, method="lanczos", tol=1e-12, max_iter=60, seed=seed)
    early = operator_norm_lower(op, method="lanczos", tol=1e-12, max_iter=60, seed=seed, stall_tol=stall)
    assert early.value <= exact * (1 + 1e-12)
    assert early.iterations <= full.iterations
    if early.iterations < full.iterations:  # it stopped on the stall test, not on tol
        assert not early.details["converged"]


def test_windowed_plane_wave_starts_closer_on_a_zero_padded_layer():
    from spectral.circulant import fourier_certificate, plane_wave

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, 3, 3, generator=g, dtype=torch.float64) / 12
    op = LayerOperator.conv(w, (16, 12, 12), 1, 1)
    cert = fourier_certificate(w, (13, 13), rho=1e-3)
    d = cert.details
    quotients = []
    for window in (False, True):
        x = plane_wave(op, d["argmax_frequency"], d["argmax_group"], d["argmax_vector"], d["coarse_grid"], [1, 1],
                       window=window)
        assert x.shape == (1, 16, 12, 12) and torch.linalg.vector_norm(x) == pytest.approx(1.0)
        quotients.append(float(torch.linalg.vector_norm(op.forward(x))))
    assert quotients[0] < quotients[1] <= operator_norm_dense(op).value * (1 + 1e-12)


def test_warm_start_converges_immediately():
    op = _op(3, n=9)
    first = operator_norm_lower(op, method="lanczos", tol=1e-10, max_iter=500)
    again = operator_norm_lower(op, method="power", tol=1e-8, init=first.details["vector"])
    assert again.iterations <= 3
    assert abs(again.value - first.value) <= 1e-8 * first.value


def test_lanczos_beats_power_in_iterations():
    op = _op(5, c=4, n=6)
    p = operator_norm_lower(op, method="power", tol=1e-7, max_iter=2000)
    lz = operator_norm_lower(op, method="lanczos", tol=1e-7, max_iter=2000)
    assert lz.iterations < p.iterations
    assert abs(lz.value - p.value) < 1e-5 * lz.value


def test_float32_map_and_errors():
    op = LayerOperator.conv(torch.randn(2, 2, 3, 3), (2, 5, 5), padding=1)
    nv = operator_norm_lower(op, method="lanczos")
    assert nv.details["vector"].dtype == torch.float32
    with pytest.raises(ValueError, match="power, lanczos"):
        operator_norm_lower(op, method="arnoldi")
    with pytest.raises(TypeError, match="dtype"):
        operator_norm_lower(op, init=torch.randn(2, 5, 5, dtype=DT))
    with pytest.raises(ValueError, match="entries"):
        operator_norm_lower(op, init=torch.randn(3))
