"""Exact circular spectra (FFT, polyphase stride) against the dense SVD of the unrolled operator."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spectral.exact import (
    conv_operator_norm_circular,
    conv_singular_values_circular,
    operator_norm_dense,
    singular_values_dense,
)
from spectral.guarantee import Guarantee
from spectral.operators import LayerOperator, compose, ChannelScale

DT = torch.float64


def _circular_op(w, n, stride=1, dilation=1, groups=1):
    nd = w.dim() - 2
    k = w.shape[-1]
    total = dilation * (k - 1)
    pads = (total // 2, total - total // 2) * nd
    shape = (w.shape[1] * groups,) + (n,) * nd
    return LayerOperator.conv(w, shape, stride=stride, padding=pads, dilation=dilation, groups=groups,
                              padding_mode="circular")


@pytest.mark.parametrize(
    "c_out,c_in,k,n,stride,dilation,groups",
    [
        (3, 4, 3, 6, 1, 1, 1),
        (5, 2, 3, 8, 1, 1, 1),
        (3, 4, 3, 6, 2, 1, 1),
        (4, 2, 3, 6, 3, 1, 1),
        (4, 4, 3, 8, 2, 2, 2),
        (2, 3, 5, 4, 1, 1, 1),  # kernel as large as the grid: taps wrap around
        (4, 3, 2, 6, 2, 1, 1),  # even kernel, asymmetric padding
        (6, 6, 3, 4, 1, 1, 3),
    ],
)
def test_fft_spectrum_equals_dense_svd(c_out, c_in, k, n, stride, dilation, groups):
    w = torch.randn(c_out, c_in // groups, k, k, dtype=DT)
    op = _circular_op(w, n, stride, dilation, groups)
    dense_sv = singular_values_dense(op)
    fft_sv = conv_singular_values_circular(w, n, stride, dilation, groups)
    assert fft_sv.shape == dense_sv.shape
    torch.testing.assert_close(fft_sv, dense_sv, rtol=0, atol=1e-10)
    norm = conv_operator_norm_circular(w, n, stride, dilation, groups)
    assert norm.guarantee is Guarantee.EXACT
    assert abs(norm.value - dense_sv[0].item()) < 1e-10


def test_conv1d_and_rectangular_grid():
    w = torch.randn(3, 2, 3, dtype=DT)
    op = _circular_op(w, 10, stride=2)
    torch.testing.assert_close(conv_singular_values_circular(w, 10, 2), singular_values_dense(op), rtol=0, atol=1e-10)
    w2 = torch.randn(3, 2, 3, 3, dtype=DT)
    op2 = LayerOperator.conv(w2, (2, 6, 4), padding=1, padding_mode="circular")
    torch.testing.assert_close(conv_singular_values_circular(w2, (6, 4)), singular_values_dense(op2),
                               rtol=0, atol=1e-10)


def test_grouped_norm_is_max_over_groups():
    w = torch.randn(6, 2, 3, 3, dtype=DT)
    whole = conv_operator_norm_circular(w, 6, groups=3).value
    parts = [conv_operator_norm_circular(w[2 * j:2 * j + 2], 6).value for j in range(3)]
    assert abs(whole - max(parts)) < 1e-12
    dense = operator_norm_dense(_circular_op(w, 6, groups=3)).value
    assert abs(whole - dense) < 1e-10


def test_kaiming_square_layer_near_two_sqrt_two():
    # Kaiming-normal (fan_in, gain sqrt 2) 3x3, 64 channels, circular 16x16: norm ~ 2*sqrt(2)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (64 * 9)))
    value = conv_operator_norm_circular(conv.weight, 16).value
    assert abs(value / (2 * math.sqrt(2)) - 1) < 0.05, value


def test_float32_result_dtype_and_bad_inputs():
    w = torch.randn(3, 3, 3, 3)
    assert conv_singular_values_circular(w, 4).dtype == torch.float32
    with pytest.raises(ValueError, match="divide"):
        conv_operator_norm_circular(w, 5, stride=2)
    with pytest.raises(TypeError, match="float32 or float64"):
        conv_operator_norm_circular(w.half(), 4)
    with pytest.raises(ValueError, match="channels"):
        conv_operator_norm_circular(w, (4, 8, 8))
    assert conv_operator_norm_circular(w, (3, 8, 8)).value == pytest.approx(conv_operator_norm_circular(w, 8).value)


def test_operator_norm_dense_on_composed_map():
    A = torch.randn(4, 6, dtype=DT)
    op = compose(LayerOperator.linear(A), ChannelScale((4,), torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DT)))
    expected = torch.linalg.matrix_norm(torch.diag(torch.tensor([1.0, 2, 3, 4], dtype=DT)) @ A, 2).item()
    nv = operator_norm_dense(op)
    assert nv.guarantee is Guarantee.EXACT and abs(nv.value - expected) < 1e-12
