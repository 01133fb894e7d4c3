"""float32 networks: every certified or exact network value is computed in float64 from the float32
parameters, so it is >= the float64 reference of the same network (up to the reference's own float64
round-off, 1e-12 relative here; a float32 computation was up to ~1e-7 below it)."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from lipschitz.bounds import METHODS, network_bound
from tests.test_lipschitz_bounds import _max_jacobian_norm, _randomise_bn

REF_RTOL = 1e-12  # float64 round-off of the reference (jacrev + SVD), far below float32's 6e-8


def _float64_reference(model: nn.Module, shape: tuple, n_points: int, seed: int) -> float:
    """max over random points of the jacrev Jacobian norm of the float64 copy of a float32 model."""
    return _max_jacobian_norm(copy.deepcopy(model).double(), shape, n_points=n_points, seed=seed)


def test_batchnorm_only_network_is_not_below_the_float64_value():
    """The issue's reproducer: 102 of 200 float32 BatchNorm1d(6) nets were below the float64 value."""
    below = 0
    for seed in range(200):
        bn = _randomise_bn(nn.BatchNorm1d(6), seed)
        nb = network_bound(nn.Sequential(bn), (6,), compare=False)
        exact = float((bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).abs().max())
        below += nb.value.value < exact
        assert nb.value.value == pytest.approx(exact, rel=1e-14)
    assert below == 0


def test_float32_linear_network_exact_value_is_the_float64_value():
    torch.manual_seed(0)
    model = _randomise_bn(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Flatten(),
                                     nn.Linear(27, 4)), 1)
    nb = network_bound(model, (2, 3, 3))
    ref = _float64_reference(model, (2, 3, 3), 1, 0)  # linear: the Jacobian is the map
    for meth in METHODS:
        assert nb.comparison[meth] >= ref * (1 - REF_RTOL)
    assert nb.value.guarantee.value == "exact" and nb.value.value == pytest.approx(ref, rel=3e-9)


def _float32_net(kind: str, seed: int, act: str) -> tuple[nn.Module, tuple]:
    from experiments.models.wideresnet import WideResNet

    torch.manual_seed(seed)
    a = {"relu": nn.ReLU, "silu": nn.SiLU}[act]
    if kind == "wrn":
        model = WideResNet(depths=(1, 1), widths=(2, 3, 4), strides=(1, 2), num_classes=3, activation=act,
                           in_channels=1, normalize=((0.4,), (0.3,)))
        return _randomise_bn(model, seed), (1, 4, 4)
    if kind == "bn-act":
        return _randomise_bn(nn.Sequential(nn.BatchNorm1d(5), a(), nn.BatchNorm1d(5)), seed), (5,)
    model = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), a(),
                          nn.AvgPool2d(2), nn.BatchNorm2d(3), a(), nn.Flatten(), nn.Linear(12, 3))
    return _randomise_bn(model, seed), (1, 4, 4)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10**6), kind=st.sampled_from(["wrn", "bn-act", "seq"]),
       act=st.sampled_from(["relu", "silu"]))
def test_property_float32_network_certified_at_least_float64_reference(seed, kind, act):
    model, shape = _float32_net(kind, seed, act)
    assert next(model.parameters()).dtype == torch.float32
    nb = network_bound(model, shape)
    ref = _float64_reference(model, shape, 3, seed)
    for meth in METHODS:
        assert nb.comparison[meth] >= ref * (1 - REF_RTOL), (meth, nb.comparison[meth], ref)
    for rec in nb.nodes:
        for meth in METHODS:
            assert rec[meth] > 0
