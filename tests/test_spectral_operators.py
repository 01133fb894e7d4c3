"""LayerOperator and linear-map building blocks: forward equals the module, adjoint is exact."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from spectral.operators import (
    ChannelScale,
    LayerOperator,
    Reshape,
    compose,
    dense_matrix,
    sum_maps,
)

DT = torch.float64


def _dot_test(op, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((3, *op.in_shape), generator=g, dtype=DT)
    y = torch.randn((3, *op.out_shape), generator=g, dtype=DT)
    lhs = (op.forward(x) * y).sum()
    rhs = (x * op.adjoint(y)).sum()
    return abs(lhs - rhs).item() / max(1.0, abs(lhs).item())


CONV2D_CASES = list(
    itertools.product(
        ["zeros", "circular", "reflect", "replicate"],  # padding mode
        [1, 3],  # stride
        [1, 2],  # dilation
        [1, 2],  # groups
        [0, 2],  # padding
    )
)


@pytest.mark.parametrize("mode,stride,dilation,groups,padding", CONV2D_CASES)
def test_conv2d_adjoint_dot_product_and_forward_match_module(mode, stride, dilation, groups, padding):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     padding_mode=mode, bias=True).double()
    shape = (4, 9, 8)
    op = LayerOperator.from_module(conv, shape)
    x = torch.randn(2, *shape, dtype=DT)
    expected = conv(x) - conv.bias.view(1, -1, 1, 1)
    assert op.out_shape == tuple(expected.shape[1:])
    torch.testing.assert_close(op.forward(x), expected, rtol=1e-12, atol=1e-12)
    assert _dot_test(op) < 1e-12


@pytest.mark.parametrize("mode,stride,padding", list(itertools.product(["zeros", "circular", "reflect", "replicate"], [1, 2], [1, 2])))
def test_conv1d_adjoint_and_forward(mode, stride, padding):
    conv = nn.Conv1d(3, 5, 3, stride=stride, padding=padding, padding_mode=mode, bias=False).double()
    op = LayerOperator.from_module(conv, (3, 11))
    x = torch.randn(2, 3, 11, dtype=DT)
    torch.testing.assert_close(op.forward(x), conv(x), rtol=1e-12, atol=1e-12)
    assert _dot_test(op) < 1e-12


@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
def test_same_padding_even_kernel_matches_module():
    for mode in ["zeros", "circular", "reflect"]:
        conv = nn.Conv2d(2, 3, (4, 3), padding="same", padding_mode=mode, bias=False).double()
        op = LayerOperator.from_module(conv, (2, 7, 6))
        x = torch.randn(1, 2, 7, 6, dtype=DT)
        torch.testing.assert_close(op.forward(x), conv(x))
        assert _dot_test(op) < 1e-12


def test_dense_matches_forward_and_adjoint_is_transpose():
    op = LayerOperator.conv(torch.randn(3, 2, 3, 3, dtype=DT), (2, 5, 5), stride=2, padding=1, padding_mode="reflect")
    A = op.dense()
    x = torch.randn(1, *op.in_shape, dtype=DT)
    torch.testing.assert_close(A @ x.flatten(), op.forward(x).flatten())
    y = torch.randn(1, *op.out_shape, dtype=DT)
    torch.testing.assert_close(A.T @ y.flatten(), op.adjoint(y).flatten())


def test_dense_size_limit_is_a_clear_error():
    op = LayerOperator.conv(torch.randn(4, 4, 3, 3), (4, 16, 16), padding=1)
    with pytest.raises(ValueError, match="max_entries"):
        op.dense(max_entries=1000)


def test_linear_operator_and_leading_dims():
    W = torch.randn(5, 7, dtype=DT)
    op = LayerOperator.from_module(nn.Linear(7, 5).double(), (7,))
    assert op.in_shape == (7,) and op.out_shape == (5,)
    op = LayerOperator.linear(W)
    torch.testing.assert_close(op.dense(), W)
    op2 = LayerOperator.linear(W, (3, 7))
    assert op2.out_shape == (3, 5) and _dot_test(op2) < 1e-12
    torch.testing.assert_close(torch.linalg.matrix_norm(op2.dense(), 2), torch.linalg.matrix_norm(W, 2))


def test_dtype_is_kept_and_mismatch_refused():
    op32 = LayerOperator.conv(torch.randn(2, 2, 3, 3), (2, 5, 5), padding=1)
    assert op32.forward(torch.randn(1, 2, 5, 5)).dtype == torch.float32
    assert op32.dense().dtype == torch.float32
    with pytest.raises(TypeError, match="dtype"):
        op32.forward(torch.randn(1, 2, 5, 5, dtype=DT))
    with pytest.raises(ValueError, match="shape"):
        op32.forward(torch.randn(1, 2, 6, 5))


def test_bad_inputs_raise_readable_errors():
    with pytest.raises(ValueError, match="padding_mode"):
        LayerOperator.conv(torch.randn(2, 2, 3, 3), (2, 5, 5), padding_mode="mirror")
    with pytest.raises(ValueError, match="input channels"):
        LayerOperator.conv(torch.randn(2, 2, 3, 3), (3, 5, 5))
    with pytest.raises(ValueError, match="input_shape"):
        LayerOperator.conv(torch.randn(2, 2, 3, 3), (2, 5))
    with pytest.raises(ValueError, match="larger"):
        LayerOperator.conv(torch.randn(2, 2, 5, 5), (2, 3, 3))
    with pytest.raises(TypeError, match="supported"):
        LayerOperator.from_module(nn.ReLU(), (3,))


def test_compose_channel_scale_sum_reshape():
    conv = LayerOperator.conv(torch.randn(3, 2, 3, 3, dtype=DT), (2, 4, 4), padding=1)
    scale = ChannelScale((3, 4, 4), torch.tensor([1.0, -2.0, 0.5], dtype=DT))
    flat = Reshape((3, 4, 4), (48,), dtype=DT)
    lin = LayerOperator.linear(torch.randn(5, 48, dtype=DT))
    chain = compose(conv, scale, flat, lin)
    assert chain.in_shape == (2, 4, 4) and chain.out_shape == (5,)
    expected = lin.dense() @ scale.dense() @ conv.dense()
    torch.testing.assert_close(dense_matrix(chain), expected)
    assert _dot_test(chain) < 1e-12
    res = sum_maps(conv, compose(conv, ChannelScale((3, 4, 4), torch.ones(3, dtype=DT))))
    torch.testing.assert_close(res.dense(), 2 * conv.dense())
    with pytest.raises(ValueError, match="compose"):
        compose(conv, lin)
    with pytest.raises(TypeError, match="linear map"):
        compose(conv, object())
