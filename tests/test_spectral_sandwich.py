"""sandwich / Fourier certificate / probabilistic upper bound, checked against dense SVD ground truth."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spectral.exact import iter_fourier_blocks, operator_norm_dense
from spectral.guarantee import Guarantee
from spectral.operators import LayerOperator
from spectral.probabilistic import krylov_failure_probability, krylov_relative_error, probabilistic_upper
from spectral.sandwich import (
    _FourierGram,
    circular_grid,
    fourier_certificate,
    padding_operator_norm,
    sandwich,
)

FORCE_BOUNDS = {"dense_max_entries": 0, "fft_svd_max_flops": 0}


def _dense_norm(weight, in_shape, stride=1, padding=0, padding_mode="zeros", dilation=1, groups=1):
    op = LayerOperator.conv(weight.double(), in_shape, stride, padding, dilation, groups, padding_mode)
    return operator_norm_dense(op).value


@pytest.mark.parametrize(
    "c_out,c_in,kernel,grid,stride,dilation,groups",
    [
        (5, 3, (3, 3), (6, 6), (1, 1), (1, 1), 1),  # side "out" would be 5 > 3: side "in"
        (3, 5, (3, 3), (6, 6), (1, 1), (1, 1), 1),  # side "out"
        (6, 2, (3, 3), (8, 6), (2, 2), (1, 1), 1),  # strided, side "in" (2*4 = 8 > 6)
        (3, 4, (3, 2), (6, 4), (2, 2), (1, 1), 1),  # strided, side "out"
        (4, 4, (3, 3), (8, 8), (1, 1), (2, 2), 2),  # dilation and groups
        (4, 3, (5,), (12,), (3,), (1,), 1),  # conv1d strided
        (6, 3, (1, 1), (6, 6), (2, 2), (1, 1), 1),  # 1x1 strided shortcut: one distinct block
    ],
)
def test_fourier_gram_blocks_have_the_fft_spectra(c_out, c_in, kernel, grid, stride, dilation, groups):
    torch.manual_seed(1)
    w = torch.randn(c_out, c_in // groups if groups > 1 else c_in, *kernel, dtype=torch.float64)
    if groups > 1:
        w = torch.randn(c_out, c_in // groups, *kernel, dtype=torch.float64)
    fg = _FourierGram(w, grid, stride, dilation, groups, torch.float64)
    H = fg.blocks(torch.arange(fg.freqs.shape[0]))  # (F, g, n, n)
    ours = torch.sort(torch.linalg.eigvalsh(H).flatten().clamp(min=0).sqrt(), descending=True).values
    size = grid if len(grid) > 1 else grid[0]
    s_arg = stride if len(stride) > 1 else stride[0]
    d_arg = dilation if len(dilation) > 1 else dilation[0]
    blocks = torch.cat(list(iter_fourier_blocks(w, size, s_arg, d_arg, groups, onesided=True)))
    ref = torch.sort(torch.linalg.svdvals(blocks).flatten(), descending=True).values
    # same set of singular values (the conjugate half grids may differ; the larger side adds zeros)
    ours, ref = ours[ours > 1e-6 * ours[0]], ref[ref > 1e-6 * ref[0]]
    dist = (ours[:, None] - ref[None, :]).abs()
    assert dist.min(dim=1).values.max() < 1e-9 and dist.min(dim=0).values.max() < 1e-9
    assert ours[0] == pytest.approx(float(ref[0]), rel=1e-12)
    # the top input vector of a block really is amplified by that block's top singular value
    f = int(torch.randint(fg.freqs.shape[0], (1,)))
    B = fg.frequency_block(fg.freqs[f], 0)
    assert torch.allclose(torch.linalg.svdvals(B)[0] ** 2, torch.linalg.eigvalsh(H[f, 0])[-1], rtol=1e-9)


def test_fourier_certificate_bounds_the_circular_norm_and_is_tight():
    torch.manual_seed(2)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    exact = _dense_norm(w, (4, 8, 8), padding=1, padding_mode="circular")
    cert = fourier_certificate(w, (8, 8), rho=1e-3)
    assert cert.guarantee is Guarantee.UPPER
    assert exact <= cert.value <= exact * (1 + 2.5e-3)
    assert cert.details["circulant_lower"] <= exact * (1 + 1e-12)
    # a too-low target forces failures that are then certified individually: still an upper bound
    low = fourier_certificate(w, (8, 8), rho=1e-3, sample_blocks=1, power_iters=1)
    assert low.value >= exact


@pytest.mark.parametrize("estimator", ["power", "lanczos"])
def test_both_level_estimators_give_valid_tight_certificates(estimator):
    """The Lanczos estimator (the ladder's) and the power procedure (strategy="circulant") choose levels only:
    both certificates bound the dense circular norm; forced failures (one sampled block, one step) stay valid."""
    torch.manual_seed(4)
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    exact = _dense_norm(w, (5, 7, 7), padding=1, padding_mode="circular")
    cert = fourier_certificate(w, (7, 7), rho=1e-3, estimator=estimator)
    assert exact <= cert.value <= exact * (1 + 2.5e-3)
    assert cert.details["circulant_lower"] <= exact * (1 + 1e-12)
    low = fourier_certificate(w, (7, 7), rho=1e-3, sample_blocks=1, power_iters=1, estimator=estimator)
    assert low.value >= exact and low.details["failed"] > 0


def test_lanczos_estimate_returns_ritz_pairs_and_rejects_unknown_estimators():
    from spectral.circulant import top_estimate

    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 4, 20, 20, dtype=torch.complex128, generator=g)
    H = A @ A.mH
    theta, vec = top_estimate(H, 20, g, "lanczos")  # 20 steps on 20x20 blocks: exact up to round-off
    top = torch.linalg.eigvalsh(H)[..., -1]
    assert theta.shape == (3, 4) and vec.shape == (3, 4, 20)
    assert torch.allclose(theta, top, rtol=1e-9)
    rayleigh = torch.einsum("...i,...ij,...j->...", vec.conj(), H, vec).real
    assert torch.allclose(rayleigh, top, rtol=1e-8)
    assert torch.allclose(torch.linalg.vector_norm(vec, dim=-1), torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown estimator 'qr'"):
        top_estimate(H, 5, g, "qr")
    with pytest.raises(ValueError, match="unknown estimator"):
        fourier_certificate(torch.randn(2, 2, 3, 3), (4, 4), estimator="qr")


def test_float32_certificate_carries_a_larger_roundoff_margin_but_stays_valid():
    torch.manual_seed(3)
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    exact = _dense_norm(w, (8, 6, 6), padding=1, padding_mode="circular")
    c64 = fourier_certificate(w, (6, 6), rho=1e-3, dtype=torch.float64)
    c32 = fourier_certificate(w, (6, 6), rho=1e-3, dtype=torch.float32)
    assert c32.value >= exact and c64.value >= exact
    assert c32.details["max_roundoff_margin_rel"] > 1e3 * c64.details["max_roundoff_margin_rel"]


@settings(max_examples=20, deadline=None)
@given(
    c_in=st.integers(1, 4),
    c_out=st.integers(1, 4),
    k=st.integers(1, 3),
    n=st.integers(3, 7),
    stride=st.integers(1, 2),
    pad=st.integers(0, 2),
    mode=st.sampled_from(["zeros", "circular", "reflect", "replicate"]),
    seed=st.integers(0, 10_000),
)
def test_sandwich_brackets_the_dense_norm(c_in, c_out, k, n, stride, pad, mode, seed):
    if mode == "reflect":
        pad = min(pad, n - 1)
    if n + 2 * pad < k:
        pad = k
        if mode == "reflect":
            return
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64)
    in_shape = (c_in, n, n)
    exact = _dense_norm(w, in_shape, stride, pad, mode)
    s = sandwich(w, in_shape, stride=stride, padding=pad, padding_mode=mode, **FORCE_BOUNDS)
    assert s.lower.value <= exact * (1 + 1e-9)
    assert s.upper.value >= exact * (1 - 1e-9)
    assert s.lower.guarantee in (Guarantee.LOWER, Guarantee.EXACT)
    assert s.upper.guarantee in (Guarantee.UPPER, Guarantee.EXACT)
    default = sandwich(w, in_shape, stride=stride, padding=pad, padding_mode=mode, dense_max_entries=2**20)
    assert default.exact is not None and default.gap == 0.0
    assert default.exact.value == pytest.approx(exact, rel=1e-9)


@settings(max_examples=10, deadline=None)
@given(stride=st.integers(1, 2), dilation=st.integers(1, 2), groups=st.sampled_from([1, 2]),
       seed=st.integers(0, 10_000))
def test_sandwich_dilation_groups_conv1d(stride, dilation, groups, seed):
    g = torch.Generator().manual_seed(seed)
    w2 = torch.randn(4, 4 // groups, 3, 3, generator=g, dtype=torch.float64)
    exact = _dense_norm(w2, (4, 8, 8), stride, 2, "zeros", dilation, groups)
    s = sandwich(w2, (4, 8, 8), stride=stride, padding=2, dilation=dilation, groups=groups, **FORCE_BOUNDS)
    assert s.lower.value <= exact * (1 + 1e-9) <= s.upper.value * (1 + 2e-9)
    w1 = torch.randn(4, 4 // groups, 3, generator=g, dtype=torch.float64)
    op1 = LayerOperator.conv(w1, (4, 10), stride, 1, dilation, groups)
    exact1 = operator_norm_dense(op1).value
    s1 = sandwich(w1, (4, 10), stride=stride, padding=1, dilation=dilation, groups=groups, **FORCE_BOUNDS)
    assert s1.lower.value <= exact1 * (1 + 1e-9) <= s1.upper.value * (1 + 2e-9)


def test_sandwich_circular_same_is_exact_and_kaiming_layer_is_tight():
    torch.manual_seed(4)
    conv = nn.Conv2d(16, 16, 3, padding=1, padding_mode="circular", bias=False)
    s = sandwich(conv, (16, 8, 8))
    assert s.exact is not None and s.exact.method == "fft_circular"
    ref = _dense_norm(conv.weight.detach(), (16, 8, 8), padding=1, padding_mode="circular")
    assert s.exact.value == pytest.approx(ref, rel=1e-5)
    # zero padding, non-trivial size: certified bounds within rtol
    zconv = nn.Conv2d(12, 12, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(zconv.weight)
    z = sandwich(zconv, (12, 8, 8), rtol=0.03, dense_max_entries=0)
    zref = _dense_norm(zconv.weight.detach(), (12, 8, 8), padding=1)
    assert z.lower.value <= zref * (1 + 1e-5) and z.upper.value >= zref * (1 - 1e-9)
    # boundary-aware ladder: the certificate sees the zero padding, so rtol is reached at this small size
    assert z.converged and z.gap <= 0.03 and z.reason is None
    assert z.upper.method in ("fft_cholesky", "axis_cholesky", "banded_cholesky")
    assert z.upper.guarantee is Guarantee.UPPER
    old = sandwich(zconv, (12, 8, 8), rtol=0.03, dense_max_entries=0, strategy="circulant")
    assert old.upper.method == "fft_cholesky" and old.upper.value >= zref * (1 - 1e-9)


def test_sandwich_linear_and_module_parameters():
    torch.manual_seed(5)
    lin = nn.Linear(300, 200)
    s = sandwich(lin, (300,), dense_max_entries=0)
    assert s.exact is not None and s.exact.value == pytest.approx(
        torch.linalg.matrix_norm(lin.weight.detach().double(), 2).item(), rel=1e-12
    )
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=True)
    a = sandwich(conv, (3, 6, 6), **FORCE_BOUNDS)
    b = sandwich(conv.weight.detach(), (3, 6, 6), stride=2, padding=1, **FORCE_BOUNDS)
    assert a.upper.value == pytest.approx(b.upper.value, rel=1e-12)
    assert a.layer["stride"] == [2, 2]


def test_sandwich_to_dict_is_json_and_lists_methods():
    torch.manual_seed(6)
    w = torch.randn(4, 3, 3, 3)
    s = sandwich(w, (3, 7, 7), padding=1, probabilistic=True, delta=1e-2, **FORCE_BOUNDS)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["upper"]["guarantee"] == "certified_upper"
    assert d["lower"]["guarantee"] == "lower"
    assert d["probabilistic_upper"]["guarantee"] == "probabilistic_upper"
    assert d["probabilistic_upper"]["details"]["failure_probability"] == 1e-2
    roles = {m["role"] for m in d["methods"]}
    assert {"lower", "upper", "probabilistic_upper"} <= roles
    assert "vector" not in d["lower"]["details"]
    assert d["gap"] == pytest.approx(s.gap)


@pytest.mark.parametrize("upper_method", ["singla_feizi", "gram", "frobenius"])
def test_sandwich_with_forced_upper_methods_and_budget_fallback(upper_method):
    torch.manual_seed(9)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    exact = _dense_norm(w, (4, 7, 7), 2, 1)
    s = sandwich(w, (4, 7, 7), stride=2, padding=1, upper_method=upper_method, **FORCE_BOUNDS)
    assert s.upper.method == upper_method and s.lower.value <= exact * (1 + 1e-9) <= s.upper.value * (1 + 1e-9)
    cheap = sandwich(w, (4, 7, 7), stride=2, padding=1, budget_seconds=1e-9, **FORCE_BOUNDS)
    assert cheap.layer["plan"]["chosen_upper"] == "singla_feizi" and cheap.upper.value >= exact


def test_sandwich_bad_input_messages():
    with pytest.raises(ValueError, match="upper_method"):
        sandwich(torch.randn(2, 2, 3, 3), (2, 5, 5), upper_method="magic")
    with pytest.raises(TypeError, match="Conv1d, nn.Conv2d, nn.Linear"):
        sandwich(nn.ReLU(), (3, 4, 4))
    with pytest.raises(ValueError, match="rtol"):
        sandwich(torch.randn(2, 2, 3, 3), (2, 5, 5), rtol=0)
    with pytest.raises(ValueError, match="NaN"):
        sandwich(torch.full((2, 2, 3, 3), float("nan")), (2, 5, 5))
    with pytest.raises(ValueError, match="lower_method"):
        sandwich(torch.randn(2, 2, 3, 3), (2, 5, 5), lower_method="magic")
    with pytest.raises(ValueError, match="input channels"):
        sandwich(torch.randn(2, 2, 3, 3), (3, 5, 5))


@pytest.mark.parametrize("mode,pad", [("reflect", 1), ("reflect", 2), ("replicate", 2), ("circular", 3), ("zeros", 2)])
def test_padding_operator_norm_matches_dense(mode, pad):
    op = LayerOperator.conv(torch.ones(1, 1, 1, 1, dtype=torch.float64), (1, 4, 5), padding=pad, padding_mode=mode)
    ref = operator_norm_dense(op).value
    assert padding_operator_norm((1, 4, 5), op.padding, mode) == pytest.approx(ref, rel=1e-12)


def test_circular_grid_is_padded_size_rounded_to_stride():
    assert circular_grid((32, 32), ((1, 1), (1, 1)), (1, 1)) == (34, 34)
    assert circular_grid((32, 31), ((1, 1), (1, 1)), (2, 2)) == (34, 34)
    assert circular_grid((16,), ((0, 0),), (3,)) == (18,)


# ------------------------------------------------------------------------------ probabilistic upper bound
def _matrix_with_spectrum(n, top_gap, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    s = torch.sqrt(torch.linspace(0.0, 1.0 - top_gap, n, dtype=torch.float64))
    s[-1] = 1.0
    return q * s  # singular values s, norm exactly 1


def test_failure_probability_is_monotone_and_inverts():
    n = 500
    p_small = krylov_failure_probability(n, 10, 0.05)
    p_big = krylov_failure_probability(n, 10, 0.2)
    assert 0 <= p_big < p_small <= 1
    assert krylov_failure_probability(n, 10, 0.1, "lanczos") <= krylov_failure_probability(n, 10, 0.1, "power")
    eps = krylov_relative_error(n, 10, 1e-3)
    assert krylov_failure_probability(n, 10, eps) <= 1e-3 < krylov_failure_probability(n, 10, eps * 0.99)
    with pytest.raises(ValueError, match="delta"):
        krylov_relative_error(n, 10, 0.0)
    with pytest.raises(ValueError, match="method"):
        krylov_failure_probability(n, 10, 0.1, "magic")


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_probabilistic_upper_violation_rate_is_below_delta(method):
    """Monte Carlo over random starts on adversarial spectra: P(value < ||M||) must stay below delta,
    while the raw Ritz value (what a naive method reports) violates almost always."""
    n, delta, trials = 40, 0.2, 150
    M = _matrix_with_spectrum(n, 0.02, seed=7)
    violations = naive_violations = 0
    for t in range(trials):
        r = probabilistic_upper(M, delta=delta, method=method, max_iter=3, min_iter=3, seed=t)
        assert r.guarantee is Guarantee.PROBABILISTIC_UPPER and r.details["failure_probability"] == delta
        violations += r.value < 1.0 - 1e-12
        naive_violations += r.details["ritz_value"] < 1.0 - 1e-12
    # binomial slack: with a true rate <= delta, 150 trials exceed delta + 0.1 with prob < 1e-3
    assert violations / trials <= delta + 0.1
    assert naive_violations / trials > 0.9


def test_probabilistic_upper_on_an_operator_converges_to_the_norm():
    torch.manual_seed(8)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    op = LayerOperator.conv(w, (2, 6, 6), padding=1)
    exact = operator_norm_dense(op).value
    r = probabilistic_upper(op, delta=1e-3, rtol=0.01, max_iter=72, seed=0)
    assert r.value >= exact * (1 - 1e-12)
    assert r.details["ritz_value"] <= exact * (1 + 1e-12)
    assert r.value <= exact * 1.03
    with pytest.raises(TypeError, match="linear map"):
        probabilistic_upper(object())


@pytest.mark.parametrize("upper_method", ["gram", "singla_feizi", "symbol"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate"])
def test_sandwich_conv1d_asymmetric_same_padding_upper_is_certified(upper_method, padding_mode):
    # conv1d "same" with an even kernel pads (0, 1): the forced spectral.upper route must see both sides
    torch.manual_seed(11)
    violations = 0
    for _ in range(20):
        w = torch.randn(1, 2, 2, dtype=torch.float64)
        exact = _dense_norm(w, (2, 9), padding="same", padding_mode=padding_mode)
        s = sandwich(w, (2, 9), padding="same", padding_mode=padding_mode, upper_method=upper_method,
                     **FORCE_BOUNDS)
        assert s.upper.guarantee is Guarantee.UPPER
        violations += s.upper.value < exact * (1 - 1e-9)
        assert s.lower.value <= exact * (1 + 1e-9)
    assert violations == 0


# ---------------------------------------------------------------- issue 11, item 6: zero operators
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_operator_has_norm_zero_on_every_path(dtype):
    w = torch.zeros(3, 2, 3, 3, dtype=dtype)
    s = sandwich(w, (2, 6, 6), padding=1, dense_max_entries=0)
    assert s.upper.value == 0.0 and s.lower.value == 0.0 and s.gap == 0.0
    cert = fourier_certificate(w, (6, 6), dtype=dtype)
    assert cert.value == 0.0


def test_float32_certificate_with_a_zero_frequency_block():
    # kernel [[1, -1]] (a difference filter): its symbol vanishes at frequency 0, so that block is all zero
    w = torch.tensor([[[[1.0, -1.0]]]]).repeat(2, 2, 1, 1)
    for dtype in (torch.float32, torch.float64):
        cert = fourier_certificate(w, (4, 6), dtype=dtype, sample_blocks=1, rho=1e-3)
        exact = _dense_norm(w, (2, 4, 6), padding=0, padding_mode="zeros")
        assert math.isfinite(cert.value) and cert.value >= exact
    s = sandwich(w, (2, 4, 6), padding=(0, 1), padding_mode="circular", certificate_dtype=torch.float32,
                 **FORCE_BOUNDS)
    assert s.upper.value >= _dense_norm(w, (2, 4, 6), padding=(0, 1), padding_mode="circular")


def test_sandwich_options_match_keywords_and_reject_unknown_names():
    from spectral.sandwich import SandwichOptions, sandwich as sw

    torch.manual_seed(3)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    kw = dict(padding=1, budget_seconds=30.0, lower_iters=8, rho_fraction=0.2, accept_fraction=0.6, seed=2)
    by_kw = sw(w, (3, 9, 9), 0.01, **kw)
    opts = SandwichOptions(budget_seconds=30.0, lower_iters=8, rho_fraction=0.2, accept_fraction=0.6, seed=2)
    by_opts = sw(w, (3, 9, 9), 0.01, padding=1, options=opts)
    assert (by_kw.lower.value, by_kw.upper.value) == (by_opts.lower.value, by_opts.upper.value)
    assert [s["step"] for s in by_kw.steps] == [s["step"] for s in by_opts.steps]
    # keywords override the options object
    over = sw(w, (3, 9, 9), 0.01, padding=1, options=SandwichOptions(lower_iters=3), lower_iters=8,
              budget_seconds=30.0, rho_fraction=0.2, accept_fraction=0.6, seed=2)
    assert over.upper.value == by_kw.upper.value
    with pytest.raises(TypeError, match="lower_iter.*valid options"):
        sw(w, (3, 9, 9), lower_iter=3)
    with pytest.raises(ValueError, match="unknown strategy"):
        sw(w, (3, 9, 9), options=SandwichOptions(strategy="nope"))
