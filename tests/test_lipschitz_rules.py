"""Activation slopes, pooling constants and BN folding rules against derivatives and dense Jacobians."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import jacrev

from lipschitz.rules import (absolute_value_split, activation_slope, batchnorm_scale, normalize_scale,
                             pool_lipschitz)
from spectral.guarantee import Guarantee


ACTS = {
    "silu": (nn.SiLU(), {}),
    "gelu": (nn.GELU(), {}),
    "gelu_tanh": (nn.GELU(approximate="tanh"), {"approximate": "tanh"}),
    "softplus": (nn.Softplus(beta=3.0), {"beta": 3.0}),
    "tanh": (nn.Tanh(), {}),
    "relu": (nn.ReLU(), {}),
    "leaky_relu": (nn.LeakyReLU(-1.5), {"negative_slope": -1.5}),
}


@pytest.mark.parametrize("name", list(ACTS))
def test_activation_slope_is_the_max_derivative(name):
    module, params = ACTS[name]
    kind = "gelu" if name.startswith("gelu") else name
    nv = activation_slope(kind, params)
    x = torch.linspace(-12, 12, 400001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(module(x).sum(), x)
    observed = float(g.abs().max())
    assert nv.value >= observed * (1 - 1e-12)          # certificate
    assert nv.value <= observed * (1 + 1e-6) + 1e-12    # and tight
    assert nv.guarantee in (Guarantee.EXACT, Guarantee.UPPER)


def test_known_slope_constants():
    assert activation_slope("silu").value == pytest.approx(1.0998, abs=1e-4)
    assert activation_slope("gelu").value == pytest.approx(1.1289, abs=1e-4)
    assert activation_slope("leaky_relu", {"negative_slope": 0.2}).value == 1.0
    with pytest.raises(ValueError, match="unknown activation"):
        activation_slope("swish")


def test_absolute_value_split_reproduces_activation():
    z = torch.linspace(-3, 3, 101, dtype=torch.float64)
    a, b = absolute_value_split("relu")
    assert torch.allclose(a * z + b * z.abs(), torch.relu(z))
    a, b = absolute_value_split("leaky_relu", {"negative_slope": 0.1})
    assert torch.allclose(a * z + b * z.abs(), nn.functional.leaky_relu(z, 0.1))
    assert absolute_value_split("silu") is None


def _dense_norm_at(module, in_shape, x=None):
    x = torch.rand(in_shape, dtype=torch.float64) if x is None else x
    j = jacrev(lambda t: module(t[None])[0])(x)
    out = math.prod(j.shape[:-len(in_shape)])
    return float(torch.linalg.matrix_norm(j.reshape(out, -1), ord=2))


AVG_POOLS = [
    (nn.AvgPool2d(2), (2, 6, 6)),
    (nn.AvgPool2d(3, stride=1, padding=1), (1, 5, 5)),
    (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (1, 7, 6)),
    (nn.AvgPool2d(3, stride=2, ceil_mode=True), (1, 8, 8)),
    (nn.AdaptiveAvgPool2d(1), (3, 4, 5)),
    (nn.AdaptiveAvgPool2d((2, 3)), (1, 5, 7)),
    (nn.AvgPool1d(3, stride=2, padding=1), (2, 9)),
]


@pytest.mark.parametrize("pool,shape", AVG_POOLS)
def test_avg_pool_constant_equals_dense_norm(pool, shape):
    nv = pool_lipschitz(pool, shape)
    assert nv.guarantee is Guarantee.EXACT
    assert nv.value == pytest.approx(_dense_norm_at(pool, shape), rel=1e-10)


def test_global_average_pool_is_one_over_sqrt_hw():
    assert pool_lipschitz(nn.AdaptiveAvgPool2d(1), (4, 6, 8)).value == pytest.approx(1 / math.sqrt(48), rel=1e-12)


MAX_POOLS = [
    (nn.MaxPool2d(2), (1, 6, 6), 1),
    (nn.MaxPool2d(3, stride=1, padding=1), (1, 5, 5), 9),
    (nn.MaxPool2d(3, stride=2, padding=1), (1, 7, 7), 4),
    (nn.MaxPool1d(3, stride=1), (1, 8), 3),
    (nn.AdaptiveMaxPool2d(1), (2, 3, 3), 1),
]


@pytest.mark.parametrize("pool,shape,coverage", MAX_POOLS)
def test_max_pool_constant_is_sqrt_coverage_and_attained(pool, shape, coverage):
    nv = pool_lipschitz(pool, shape)
    assert nv.value == pytest.approx(math.sqrt(coverage), rel=1e-12)
    for _ in range(5):
        assert _dense_norm_at(pool, shape) <= nv.value + 1e-12
    # attained: one large pixel at a most-covered position is the max of every window containing it
    x = torch.rand(shape, dtype=torch.float64) * 0.1
    best = 0.0
    for idx in range(math.prod(shape[1:])):
        z = x.clone().reshape(shape[0], -1)
        z[0, idx] = 10.0
        best = max(best, _dense_norm_at(pool, shape, z.reshape(shape)))
    assert best == pytest.approx(nv.value, rel=1e-12)


def test_batchnorm_scale_and_errors():
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, -1.0, 0.5]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    bn.eval()
    s = batchnorm_scale(bn)
    expected = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(s, expected, rtol=1e-14)
    assert torch.allclose(s, torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64), rtol=1e-4)
    bn.train()
    with pytest.raises(ValueError, match="eval"):
        batchnorm_scale(bn)
    with pytest.raises(TypeError):
        batchnorm_scale(nn.ReLU())
    assert torch.equal(normalize_scale(torch.tensor([0.5, 0.25])), torch.tensor([2.0, 4.0], dtype=torch.float64))
    third = normalize_scale(torch.tensor([3.0]))  # 1/3 in float64, not a float32 rounding of it
    assert third.dtype == torch.float64 and float(third) == 1.0 / 3.0
    with pytest.raises(ValueError, match="positive"):
        normalize_scale(torch.tensor([0.5, 0.0]))


def test_relu_after_negative_scale_is_abs_scale_times_one_lipschitz():
    """relu(d z + c) = |d| psi(z) with psi 1-Lipschitz: the per-coordinate difference quotient <= |d|."""
    g = torch.Generator().manual_seed(0)
    d = torch.randn(50, generator=g, dtype=torch.float64) * 3
    c = torch.randn(50, generator=g, dtype=torch.float64)
    z1, z2 = torch.randn(2, 1000, 50, generator=g, dtype=torch.float64)
    ratio = (torch.relu(d * z1 + c) - torch.relu(d * z2 + c)).abs() / (z1 - z2).abs()
    assert bool((ratio <= d.abs() * (1 + 1e-9)).all())
    assert float((ratio / d.abs()).max()) == pytest.approx(1.0, rel=1e-9)


def test_batchnorm_scale_of_a_float32_batchnorm_is_computed_in_float64():
    """A float32 scale was up to ~1e-7 relative below gamma / sqrt(var + eps) of the stored parameters."""
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm1d(64).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(64, generator=g))
        bn.running_var.copy_(torch.rand(64, generator=g) * 2 + 1e-3)
    s = batchnorm_scale(bn)
    ref = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    assert s.dtype == torch.float64
    assert torch.allclose(s, ref, rtol=1e-15, atol=0)
    f32 = bn.weight.detach() * torch.rsqrt(bn.running_var + bn.eps)
    assert float(((f32.double() - ref) / ref).abs().max()) > 1e-9  # the float32 computation is visibly off
