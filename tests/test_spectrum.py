"""spectral.spectrum: full spectra against dense SVDs of the unrolled operators, Lanczos values as lower bounds,
the power-law fit against samples of known exponent, the random-matrix comparison on random and spiked kernels."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral.guarantee import Guarantee
from spectral.operators import LayerOperator, dense_matrix
from spectral.spectrum import (_distinct, compare_with_random, fit_power_law, layer_spectrum, linear_spectrum,
                               model_spectra, quantile_profile)


def _dense(w, shape, stride=1, padding=1, mode="zeros", dilation=1, groups=1):
    op = LayerOperator.conv(w, shape, stride, padding, dilation, groups, mode)
    return torch.linalg.svdvals(dense_matrix(op)).numpy()


@pytest.mark.parametrize("mode", ["circular", "zeros", "reflect"])
@pytest.mark.parametrize("stride,k,dilation,groups", [(1, 3, 1, 1), (2, 3, 1, 1), (2, 1, 1, 1), (1, 3, 2, 1), (1, 3, 1, 2)])
def test_spectra_equal_the_dense_svd_of_the_unrolled_operator(mode, stride, k, dilation, groups):
    torch.manual_seed(0)
    w = torch.randn(8, 6 // groups, k, k, dtype=torch.float64)
    pad = dilation * (k - 1) // 2
    spec = layer_spectrum(w, (6, 8, 8), stride=stride, padding=pad, padding_mode=mode, dilation=dilation, groups=groups)
    ref = _dense(w, (6, 8, 8), stride, pad, mode, dilation, groups)
    assert spec.complete and spec.guarantee is Guarantee.EXACT
    assert spec.method == ("fft_circular" if mode == "circular" else "dense_svd")
    assert spec.values.size == ref.size
    np.testing.assert_allclose(spec.values, ref, rtol=1e-10, atol=1e-10)


def test_large_layers_get_lanczos_top_k_values_that_are_lower_bounds():
    torch.manual_seed(1)
    w = torch.randn(12, 8, 3, 3, dtype=torch.float64)
    ref = _dense(w, (8, 8, 8))
    spec = layer_spectrum(w, (8, 8, 8), padding=1, top_k=6, max_dense_entries=100)
    assert spec.method == "lanczos_topk" and not spec.complete and spec.guarantee is Guarantee.LOWER
    assert spec.values.size == 6
    assert np.all(spec.values <= ref[:6] * (1 + 1e-12))
    np.testing.assert_allclose(spec.values, ref[:6], rtol=1e-6)


@settings(max_examples=15, deadline=None)
@given(c_out=st.integers(1, 6), c_in=st.integers(1, 6), n=st.integers(3, 7), k=st.sampled_from([1, 3]),
       seed=st.integers(0, 10_000))
def test_lanczos_values_never_exceed_the_exact_ones(c_out, c_in, n, k, seed):
    w = torch.randn(c_out, c_in, k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    exact = layer_spectrum(w, (c_in, n, n), padding=k // 2)
    k_top = min(4, exact.values.size - 1)
    if k_top < 1:
        return
    lanczos = layer_spectrum(w, (c_in, n, n), padding=k // 2, top_k=k_top, max_dense_entries=1)
    assert lanczos.guarantee is Guarantee.LOWER and lanczos.values.size == k_top
    assert np.all(lanczos.values <= exact.values[:lanczos.values.size] * (1 + 1e-9) + 1e-12)
    np.testing.assert_allclose(lanczos.values, exact.values[:k_top], rtol=1e-4)


def test_subspace_fallback_for_an_operator_with_one_distinct_singular_value():
    from spectral.spectrum import _subspace_top
    from spectral.operators import LayerOperator

    w = torch.full((1, 1, 1, 1), 0.7, dtype=torch.float64)  # 0.7 x identity: ARPACK runs out of Krylov space
    spec = layer_spectrum(w, (1, 5, 5), top_k=4, max_dense_entries=1)
    np.testing.assert_allclose(spec.values, [0.7] * 4, rtol=1e-12)
    torch.manual_seed(2)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    op = LayerOperator.conv(w, (4, 6, 6), 1, 1)
    sub = _subspace_top(op, 216, 144, 5, seed=0)
    exact = _dense(w, (4, 6, 6))
    assert sub.guarantee is Guarantee.LOWER and np.all(sub.values <= exact[:5] * (1 + 1e-12))
    np.testing.assert_allclose(sub.values, exact[:5], rtol=1e-3)


def test_linear_spectrum_and_bad_input():
    w = torch.randn(5, 7, dtype=torch.float64)
    spec = linear_spectrum(w)
    np.testing.assert_allclose(spec.values, np.linalg.svd(w.numpy(), compute_uv=False))
    assert layer_spectrum(w).method == "svd_weight"
    with pytest.raises(ValueError, match="input_shape"):
        layer_spectrum(torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match="top_k"):
        layer_spectrum(torch.randn(4, 3, 3, 3), (3, 8, 8), top_k=0)


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_power_law_fit_recovers_the_exponent_of_a_pareto_sample(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    x = (1.0 - rng.random(5000)) ** (-1.0 / (alpha - 1.0))  # density ~ x^-alpha for x >= 1
    fit = fit_power_law(x)
    assert fit.alpha == pytest.approx(alpha, rel=0.08)
    assert fit.n_tail > 500


def test_power_law_fit_counts_repeated_values_once():
    base = np.random.default_rng(0).pareto(2.0, 300) + 1
    assert fit_power_law(np.repeat(base, 64)).alpha == pytest.approx(fit_power_law(base).alpha)
    assert _distinct(np.array([1.0, 1.0, 2.0, 2.0 * (1 + 1e-12), 3.0])).tolist() == [1.0, 2.0, 3.0]
    few = fit_power_law([1.0, 2.0, 3.0])
    assert few.alpha is None and "distinct" in few.note


def test_random_kernels_have_no_outliers_and_a_planted_spike_is_found():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(32, 32, 3, 3, dtype=torch.float64, generator=gen) * 0.05
    spec = layer_spectrum(w, (32, 8, 8), padding=1, padding_mode="circular")
    plain = compare_with_random(spec, w, (32, 8, 8), padding=1, padding_mode="circular", seed=5)
    assert plain.n_outliers <= 2 and plain.top_over_edge == pytest.approx(1.0, abs=0.15)
    u, v = torch.randn(32, dtype=torch.float64, generator=gen), torch.randn(32, dtype=torch.float64, generator=gen)
    spiked = w.clone()
    # a rank-one centre tap above the BBP threshold (s sqrt(N) ~ 0.85): every one of the 64 frequencies gets an outlier
    spiked[:, :, 1, 1] += 2.5 * torch.outer(u / u.norm(), v / v.norm())
    s2 = layer_spectrum(spiked, (32, 8, 8), padding=1, padding_mode="circular")
    found = compare_with_random(s2, spiked, (32, 8, 8), padding=1, padding_mode="circular", seed=5)
    assert found.n_outliers >= 16 and found.top > found.threshold >= found.bulk_edge
    assert found.random_n_outliers is not None and found.to_dict()["guarantees"]["bulk_edge"] == "estimate"


def test_quantile_profile_keeps_the_top_values_and_is_compact():
    values = np.linspace(10, 1, 1000)
    prof = quantile_profile(values, scale=2.0, points=20)
    assert prof[0] == [pytest.approx(0.5 / 1000), 5.0] and len(prof) <= 8 + 20
    assert all(a[0] < b[0] for a, b in zip(prof, prof[1:]))
    assert quantile_profile(np.array([])) == []


def test_model_spectra_rows_for_every_layer():
    from experiments.models import create_model

    torch.manual_seed(0)
    model = create_model("wrn-tiny", in_channels=1).eval()
    rows = model_spectra(model, torch.zeros(1, 1, 8, 8), random_reference=False)
    names = [r["name"] for r in rows]
    assert names[0] == "stem_conv" and names[-1] == "fc" and len(rows) == 11
    stem = rows[0]
    assert stem["method"] == "dense_svd" and stem["n_values"] == 64 and stem["guarantee"] == "exact"
    assert stem["comparison"]["top"] == pytest.approx(stem["values"][0])
    assert rows[-1]["comparison"]["random_top"] is None
