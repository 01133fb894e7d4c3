"""Random-matrix baseline: close to the true norm for random layers, far from it for structured ones."""
from __future__ import annotations

import math

import pytest
import torch

from spectral.exact import conv_operator_norm_circular, operator_norm_dense
from spectral.guarantee import Guarantee
from spectral.operators import LayerOperator
from spectral.random_matrix import (
    random_conv_norm_prediction,
    random_linear_norm_prediction,
    random_norm_ratio,
)


@pytest.mark.parametrize("m,n", [(200, 100), (300, 300), (50, 400)])
def test_linear_prediction_matches_gaussian_matrices(m, n):
    g = torch.Generator().manual_seed(m + n)
    w = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.3
    pred = random_linear_norm_prediction(w)
    exact = torch.linalg.matrix_norm(w, ord=2).item()
    assert pred.guarantee is Guarantee.ESTIMATE
    assert pred.value == pytest.approx(exact, rel=0.06)
    assert pred.details["entry_std"] == pytest.approx(0.3, rel=0.02)


@pytest.mark.parametrize("c_in,c_out,n", [(64, 64, 8), (32, 96, 8), (96, 32, 6)])
def test_conv_prediction_matches_kaiming_circular_norm(c_in, c_out, n):
    g = torch.Generator().manual_seed(c_in * c_out)
    w = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64) * math.sqrt(2 / (9 * c_in))
    exact = conv_operator_norm_circular(w, n).value
    pred = random_conv_norm_prediction(w, n)
    # the max over n^2 frequency blocks sits a little above the typical block: allow 12%
    assert pred.value == pytest.approx(exact, rel=0.12)
    if c_in == c_out:
        assert pred.value == pytest.approx(2 * math.sqrt(2), rel=0.05)


def test_strided_prediction_uses_the_polyphase_shape():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, 3, 3, generator=g, dtype=torch.float64) * math.sqrt(2 / (9 * 32))
    exact = conv_operator_norm_circular(w, 8, stride=2).value
    strided = random_conv_norm_prediction(w, 8, stride=2)
    plain = random_conv_norm_prediction(w, 8, stride=1)
    assert strided.value < plain.value
    assert strided.value == pytest.approx(exact, rel=0.15)


def test_structured_layer_is_far_from_random():
    # identical taps: a rank-one kernel concentrates all energy in one frequency
    w = torch.ones(16, 16, 3, 3, dtype=torch.float64) + 1e-3 * torch.randn(16, 16, 3, 3, dtype=torch.float64)
    op = LayerOperator.conv(w, (16, 6, 6), padding=1, padding_mode="circular")
    exact = operator_norm_dense(op).value
    pred = random_conv_norm_prediction(w, 6)
    assert random_norm_ratio(exact, pred) > 100


def test_small_input_counts_only_reachable_taps_and_conv1d_works():
    w = torch.randn(8, 8, 5, dtype=torch.float64)
    full = random_conv_norm_prediction(w)
    small = random_conv_norm_prediction(w, 2)
    assert small.details["taps"] == 2 and full.details["taps"] == 5
    assert small.value < full.value


def test_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        random_conv_norm_prediction(torch.full((2, 2, 3, 3), float("inf")))
    with pytest.raises(ValueError, match=">= 3 dims"):
        random_conv_norm_prediction(torch.randn(3))
    with pytest.raises(TypeError, match="floating"):
        random_conv_norm_prediction(torch.ones(2, 2, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="groups"):
        random_conv_norm_prediction(torch.randn(3, 2, 3, 3), groups=2)
    with pytest.raises(ValueError, match="stride"):
        random_conv_norm_prediction(torch.randn(3, 2, 3, 3), stride=(1, 2, 3))
    with pytest.raises(ValueError, match="2-D"):
        random_linear_norm_prediction(torch.randn(2, 3, 4))


def test_spectral_package_exports_resolve():
    import spectral

    for name in spectral.__all__:
        assert getattr(spectral, name) is not None
    with pytest.raises(AttributeError, match="no attribute"):
        spectral.not_a_function  # noqa: B018


def test_functions_are_not_shadowed_by_their_submodules():
    import importlib

    import spectral
    import spectral.analyze  # noqa: F401  (a submodule import must not rebind the package attribute)
    import spectral.sandwich  # noqa: F401

    importlib.import_module("spectral.analyze")
    assert callable(spectral.analyze) and spectral.analyze.__module__ == "spectral.analyze"
    assert callable(spectral.sandwich) and spectral.sandwich.__name__ == "sandwich"
