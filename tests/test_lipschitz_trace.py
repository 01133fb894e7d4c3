"""Graph extraction with torch.fx: models written the way other projects write them get certified bounds.

Ground truths: jacrev Jacobian norms at random and at optimised inputs (every method must stay above), dense
SVD of the whole map for linear models, the hand-written graphs archlip's models carried before tracing
(same bounds), and the model's own forward (the traced graph must reproduce it).
"""
from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jacrev
from hypothesis import given, settings, strategies as st

from lipschitz import GraphExtractionError, graph_from_module, network_bound, register_leaf, unregister_leaf
from lipschitz import graph as G
from lipschitz.bounds import METHODS, NetworkBound, interpret
from lipschitz.lower import attack_ratio_lower, eval_mode
from spectral.guarantee import Guarantee
from tests.reference import handwritten_graph
from tests.test_lipschitz_bounds import _randomise_bn


def _jac_norm(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    j = jacrev(lambda t: model(t[None])[0])(x)
    return torch.linalg.matrix_norm(j.reshape(-1, x.numel()), ord=2)


def _jacobian_lower(model: nn.Module, shape, n_random: int = 4, n_ascent: int = 2, steps: int = 8,
                    seed: int = 0) -> float:
    """max ||J(x)||_2 over random inputs and over inputs optimised by gradient ascent on ||J(x)||_2, and the
    l2 attack ratio (pairs optimised in l2 balls): all are lower bounds of the Lipschitz constant."""
    g = torch.Generator().manual_seed(seed)
    with eval_mode(model):
        xs = [torch.rand(shape, generator=g, dtype=torch.float64) for _ in range(n_random)]
        best = max(float(_jac_norm(model, x).detach()) for x in xs)
        for x in xs[:n_ascent]:
            x = x.clone()
            for _ in range(steps):
                step = grad(lambda t: _jac_norm(model, t))(x)
                x = x + 0.2 * step / step.norm().clamp(min=1e-12)
                best = max(best, float(_jac_norm(model, x).detach()))
        ratio = attack_ratio_lower(model, torch.stack(xs[:2]), eps=0.3, steps=10, seed=seed, clip=None)
    return max(best, ratio.value)


def _check_dominates(model: nn.Module, shape, **kw) -> NetworkBound:
    nb = network_bound(model, shape)
    lower = _jacobian_lower(model, shape, **kw)
    for meth in METHODS:
        assert nb.comparison[meth] >= lower * (1 - 1e-9), (meth, nb.comparison[meth], lower)
    assert nb.value.guarantee is Guarantee.UPPER
    json.dumps(nb.to_dict())
    return nb


# ---------------------------------------------------------------- architectures as other projects write them

class KLPreActBlock(nn.Module):
    """pytorch-cifar style: functional relu, ``hasattr(self, 'shortcut')``, ``out += shortcut``."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class KLPreActResNet(nn.Module):
    def __init__(self, c=2, num_classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c, 3, 1, 1, bias=False)
        self.layer1 = nn.Sequential(KLPreActBlock(c, c), KLPreActBlock(c, c))
        self.layer2 = nn.Sequential(KLPreActBlock(c, 2 * c, 2), KLPreActBlock(2 * c, 2 * c))
        self.bn = nn.BatchNorm2d(2 * c)
        self.linear = nn.Linear(2 * c, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer2(self.layer1(out))
        out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, 3)
        out = out.view(out.size(0), -1)
        return self.linear(out)


class KLBasicBlock(nn.Module):
    """Post-activation block with an empty ``nn.Sequential()`` identity shortcut."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class KLResNet(nn.Module):
    def __init__(self, c=2, num_classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.layer1 = nn.Sequential(KLBasicBlock(c, c))
        self.layer2 = nn.Sequential(KLBasicBlock(c, 2 * c, 2), KLBasicBlock(2 * c, 2 * c))
        self.linear = nn.Linear(2 * c, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


class SwishWRNBlock(nn.Module):
    """The Swish/SiLU WideResNet family's block (``batchnorm_0``, ``relu_0``, ``conv_0``, F.pad before a
    stride-2 conv, ``shortcut`` on the pre-activated input)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.batchnorm_0, self.relu_0 = nn.BatchNorm2d(cin), nn.SiLU()
        self.conv_0 = nn.Conv2d(cin, cout, 3, stride, padding=0, bias=False)
        self.batchnorm_1, self.relu_1 = nn.BatchNorm2d(cout), nn.SiLU()
        self.conv_1 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
        self.has_shortcut = cin != cout or stride != 1
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if self.has_shortcut else None
        self._stride = stride

    def forward(self, x):
        if self.has_shortcut:
            x = self.relu_0(self.batchnorm_0(x))
        else:
            out = self.relu_0(self.batchnorm_0(x))
        v = x if self.has_shortcut else out
        v = F.pad(v, (1, 1, 1, 1)) if self._stride == 1 else F.pad(v, (0, 1, 0, 1))
        out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(v))))
        return torch.add(self.shortcut(x) if self.has_shortcut else x, out)


class SwishWRN(nn.Module):
    def __init__(self, c=2, num_classes=3):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4914]).view(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor([0.2471]).view(1, 1, 1, 1))
        self.init_conv = nn.Conv2d(1, c, 3, 1, 1, bias=False)
        self.layer = nn.Sequential(nn.Sequential(SwishWRNBlock(c, 2 * c, 1), SwishWRNBlock(2 * c, 2 * c, 1)),
                                   nn.Sequential(SwishWRNBlock(2 * c, 2 * c, 2)))
        self.batchnorm = nn.BatchNorm2d(2 * c)
        self.relu = nn.SiLU()
        self.logits = nn.Linear(2 * c, num_classes)

    def forward(self, x):
        out = (x - self.mean) / self.std
        out = self.layer(self.init_conv(out))
        out = self.relu(self.batchnorm(out))
        return self.logits(out.mean((2, 3)))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(cin), nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class Inception(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.b1 = nn.Conv2d(cin, 2, 1)
        self.b2 = nn.Sequential(nn.Conv2d(cin, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(cin, 1, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x)], dim=1)


class DenseInceptionNet(nn.Module):
    """DenseNet layers (``torch.cat([x, f(x)], 1)``) and an Inception block of three parallel branches."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.dense = nn.Sequential(DenseLayer(2, 2), DenseLayer(4, 2))
        self.transition = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 3, 1), nn.AvgPool2d(2))
        self.inception = Inception(3)
        self.fc = nn.Linear(5 * 2 * 2, num_classes)

    def forward(self, x):
        x = self.transition(self.dense(self.conv0(x)))
        x = F.leaky_relu(self.inception(x), 0.1)
        return self.fc(x.reshape(x.shape[0], -1))


class SwishFunction(torch.autograd.Function):
    """A memory-efficient Swish with a hand-written backward, as model zoos ship it."""

    @staticmethod
    def forward(x):
        if not x.is_floating_point():  # input validation: data-dependent Python, fx cannot trace it
            raise TypeError("Swish needs floating point input")
        return x * torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * s * (1 + x * (1 - s))


class MemoryEfficientSwish(nn.Module):
    def forward(self, x):
        return SwishFunction.apply(x)


class SoftClip(nn.Module):
    """x / (1 + |x|): derivative 1 / (1 + |x|)^2 <= 1, so 1-Lipschitz (a registered rule says so)."""

    def forward(self, x):
        return x / (1 + x.abs())


class ZooNet(nn.Module):
    """Inline ``x * torch.sigmoid(x)``, a depthwise conv, an autograd-Function Swish, a registered leaf, F.gelu,
    F.softplus, functional dropout and global pooling by ``F.adaptive_avg_pool2d``."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.swish = MemoryEfficientSwish()
        self.clip = SoftClip()
        self.pw = nn.Conv2d(4, 3, 1)
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x):
        x = self.bn(self.conv(x))
        x = x * torch.sigmoid(x)
        x = self.clip(self.swish(self.bn2(self.dw(x))))
        x = F.softplus(F.gelu(self.pw(x)), beta=2.0)
        x = F.dropout(F.adaptive_avg_pool2d(x, 1), 0.2, training=self.training)
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = x.view(x.size(0), -1)
        x = torch.tanh(self.fc1(x))
        return self.fc3(F.leaky_relu(self.fc2(x), negative_slope=0.3) + 0.5 * x)


@pytest.fixture
def soft_clip_rule():
    register_leaf(SoftClip, lipschitz=1.0)
    yield
    unregister_leaf(SoftClip)


# ---------------------------------------------------------------- bounds dominate Jacobians

@pytest.mark.parametrize("cls,shape", [(KLPreActResNet, (1, 6, 6)), (KLResNet, (1, 6, 6)), (SwishWRN, (1, 6, 6)),
                                       (DenseInceptionNet, (1, 4, 4)), (MLP, (1, 4, 4))])
def test_traced_bound_dominates_jacobians(cls, shape):
    torch.manual_seed(1)
    model = _randomise_bn(cls().double(), seed=2)
    nb = _check_dominates(model, shape)
    assert nb.comparison["folded+liplt"] <= nb.comparison["product"] * (1 + 1e-9)


def test_zoo_net_with_swish_function_and_registered_leaf(soft_clip_rule):
    torch.manual_seed(3)
    model = _randomise_bn(ZooNet().double(), seed=4)
    nb = _check_dominates(model, (1, 5, 5))
    notes = " ".join(nb.notes)
    assert "swish (MemoryEfficientSwish)" in notes and "equals silu" in notes and "fx cannot trace" in notes
    assert "clip (SoftClip)" in notes and "register_leaf" in notes
    root = graph_from_module(model, (1, 5, 5))
    kinds = [n.kind for n in G.iter_nodes(root) if isinstance(n, G.Activation)]
    assert kinds == ["silu", "silu", "gelu", "softplus"]
    assert [n.params for n in G.iter_nodes(root) if isinstance(n, G.Activation)][-1]["beta"] == 2.0
    assert sum(isinstance(n, G.Leaf) for n in G.iter_nodes(root)) == 1


def test_structure_roles_and_names_of_a_foreign_resnet():
    model = _randomise_bn(KLPreActResNet().double())
    root = graph_from_module(model, (1, 6, 6))
    assert [c.role for c in root.children] == ["stem", "stage", "stage", "head"]
    assert [c.name for c in root.children[1:3]] == ["stage1", "stage2"]
    blocks = [n for n in G.iter_nodes(root) if getattr(n, "role", None) == "block"]
    assert [b.name for b in blocks] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert isinstance(blocks[0], G.Residual) and blocks[0].shortcut is None  # identity: branch holds bn1, relu
    proj = blocks[2]
    assert isinstance(proj, G.Sequential) and isinstance(proj.children[-1], G.Residual)
    assert proj.children[-1].shortcut.name == "layer2.0.shortcut"  # the shortcut sees the pre-activated input
    names = dict(model.named_modules())
    for n in G.iter_nodes(root):
        if isinstance(n, (G.Layer, G.BatchNorm)):
            assert names[n.name] is n.module
    nb = network_bound(model, (1, 6, 6), compare=False)
    assert [b["name"] for b in nb.blocks] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert [s["name"] for s in nb.stages] == ["stage1", "stage2"]


def test_swish_wrn_normalisation_is_part_of_the_graph():
    model = _randomise_bn(SwishWRN().double())
    root = graph_from_module(model, (1, 6, 6))
    first = root.children[0]
    assert isinstance(first, G.Normalize)
    assert float(first.mean) == pytest.approx(0.4914) and float(first.std) == pytest.approx(0.2471)
    assert [getattr(c, "role", None) for c in root.children] == [None, "stem", "stage", "stage", "head"]
    # a constant affine map that is not a positive scaling becomes an exact channel affine (BN with eps 0)
    neg = nn.Sequential(nn.Linear(3, 3)).double()
    model2 = _Lambda(lambda x: neg(1.0 - 2.0 * x))
    model2.neg = neg
    root2 = graph_from_module(model2, (3,))
    bn = [n for n in G.iter_nodes(root2) if isinstance(n, G.BatchNorm)]
    assert len(bn) == 1 and torch.equal(bn[0].module.weight, torch.full((3,), -2.0, dtype=torch.float64))
    assert not list(bn[0].module.parameters())


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


FUNCTIONAL_ACTS = {
    "relu": F.relu, "leaky": lambda t: F.leaky_relu(t, 0.2), "silu": F.silu, "swish": lambda t: t * torch.sigmoid(t),
    "gelu": lambda t: F.gelu(t, approximate="tanh"), "tanh": torch.tanh, "softplus": lambda t: F.softplus(t, beta=3.0),
}


class RandomFunctionalNet(nn.Module):
    """A random small net in functional style: an optional normalisation, a residual sum or a concatenation
    (or neither) around conv-BN-activation-conv, a pooling function and a flattening view."""

    def __init__(self, act: str, join: str, pool: str, normalise: bool, c: int):
        super().__init__()
        self.act, self.join, self.pool, self.normalise = FUNCTIONAL_ACTS[act], join, pool, normalise
        self.register_buffer("mean", torch.rand(1, 1, 1, 1))
        self.register_buffer("std", torch.rand(1, 1, 1, 1) + 0.2)
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
        self.fc = nn.LazyLinear(3)

    def forward(self, x):
        if self.normalise:
            x = (x - self.mean) / self.std
        x = self.stem(x)
        y = self.conv2(self.act(self.bn2(self.conv1(self.act(self.bn1(x))))))
        x = x + y if self.join == "add" else torch.cat([x, y], 1) if self.join == "cat" else y
        x = self.act(x)
        if self.pool == "avg":
            x = F.avg_pool2d(x, 2)
        elif self.pool == "max":
            x = F.max_pool2d(x, 2, 1)
        elif self.pool == "mean":
            x = x.mean((2, 3), keepdim=True)
        return self.fc(x.view(x.size(0), -1))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10**6), act=st.sampled_from(sorted(FUNCTIONAL_ACTS)),
       join=st.sampled_from(["add", "cat", "none"]), pool=st.sampled_from(["avg", "max", "mean", "none"]),
       normalise=st.booleans(), c=st.integers(1, 3))
def test_property_random_functional_nets(seed, act, join, pool, normalise, c):
    torch.manual_seed(seed)
    model = RandomFunctionalNet(act, join, pool, normalise, c).double()
    model(torch.zeros(1, 1, 4, 4, dtype=torch.float64))  # materialise the lazy layer
    model = _randomise_bn(model, seed=seed)
    nb = network_bound(model, (1, 4, 4))
    lower = _jacobian_lower(model, (1, 4, 4), n_random=3, n_ascent=1, steps=3, seed=seed)
    for meth in METHODS:
        assert nb.comparison[meth] >= lower * (1 - 1e-9), (meth, nb.comparison[meth], lower)


# ---------------------------------------------------------------- linear models: exact

class LinearFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.2]).view(1, 2, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.5]).view(1, 2, 1, 1))
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        x = self.bn(self.conv((x - self.mean) / self.std)) * 0.5
        return self.fc(x.view(x.size(0), -1))


def _dense_norm(model: nn.Module, shape) -> float:
    with eval_mode(model):
        return float(_jac_norm(model, torch.zeros(shape, dtype=torch.float64)).detach())


def test_linear_model_bound_is_the_dense_svd():
    torch.manual_seed(5)
    model = _randomise_bn(LinearFunctional().double(), seed=6)
    nb = network_bound(model, (2, 4, 4), method="folded")
    exact = _dense_norm(model, (2, 4, 4))
    assert nb.value.value == pytest.approx(exact, rel=1e-8)
    assert nb.value.guarantee is Guarantee.EXACT
    for meth in METHODS:
        assert nb.comparison[meth] >= exact * (1 - 1e-9)


def test_concat_rule_is_sqrt_of_squares_and_tight_on_a_shared_direction():
    """cat(W1 x, W2 x) with W1 = a u1 v^T, W2 = b u2 v^T: ||[W1; W2]|| = sqrt(a^2 + b^2) < a + b."""
    g = torch.Generator().manual_seed(7)
    v = torch.randn(5, generator=g, dtype=torch.float64)
    l1, l2 = nn.Linear(5, 3, bias=False).double(), nn.Linear(5, 2, bias=False).double()
    with torch.no_grad():
        l1.weight.copy_(3.0 * torch.outer(torch.randn(3, generator=g, dtype=torch.float64), v))
        l2.weight.copy_(2.0 * torch.outer(torch.randn(2, generator=g, dtype=torch.float64), v))
    model = _Lambda(lambda x: torch.cat([l1(x), l2(x)], 1))
    model.l1, model.l2 = l1, l2
    exact = _dense_norm(model, (5,))
    for meth in METHODS:
        nb = network_bound(model, (5,), method=meth, compare=False)
        assert nb.value.value == pytest.approx(exact, rel=1e-9)
        assert nb.value.value < (torch.linalg.matrix_norm(l1.weight, 2) + torch.linalg.matrix_norm(l2.weight, 2))
    root = graph_from_module(model, (5,))
    assert isinstance(root.children[0], G.Concat) and len(root.children[0].parts) == 2


def test_linear_residual_and_concat_with_identity_bound_the_dense_svd():
    torch.manual_seed(8)
    conv = nn.Conv2d(2, 2, 3, padding=1, bias=False).double()
    fc = nn.Linear(4 * 3 * 3, 2).double()
    model = _Lambda(lambda x: fc(torch.flatten(torch.cat([x, x + conv(x)], 1), 1)))
    model.conv, model.fc = conv, fc
    exact = _dense_norm(model, (2, 3, 3))
    nb = network_bound(model, (2, 3, 3))
    for meth in METHODS:
        assert nb.comparison[meth] >= exact * (1 - 1e-9)


# ---------------------------------------------------------------- archlip's own models: same bounds as their old graphs

@pytest.mark.parametrize("name,overrides", [
    ("wrn-tiny", {"activation": "gelu", "normalize": ((0.5,), (0.25,)), "dropout": 0.3}),
    ("wrn-tiny", {"depths": (2, 1, 1), "widths": (4, 4, 8, 8), "strides": (1, 1, 2)}),
    ("resnet-tiny", {"widths": (4, 4, 8, 8)}),
    ("preact-resnet-tiny", {"activation": "silu", "normalize": ((0.4,), (0.2,)), "widths": (4, 4, 8, 8)}),
])
def test_archlip_models_traced_bounds_equal_their_former_handwritten_graphs(name, overrides):
    from experiments.models import create_model

    torch.manual_seed(9)
    model = _randomise_bn(create_model(name, num_classes=5, in_channels=1, **overrides).double(), seed=10)
    shape = (1, 6, 6)
    x = torch.rand(2, *shape, dtype=torch.float64)
    ref_graph = handwritten_graph(model)
    with torch.no_grad():
        torch.testing.assert_close(interpret(ref_graph, x), model(x), rtol=0, atol=1e-12)
    # the LipSDP optimiser stops after sdp_options.time_limit seconds of Adam by default: a fixed step count
    # instead, so the two runs take the same steps whatever the machine's load (8 or 9 steps differed by 5%)
    from lipschitz.sdp import SdpOptions

    opts = SdpOptions(iters=8, time_limit=math.inf)
    traced, ref = network_bound(model, shape, sdp_options=opts), network_bound(ref_graph, shape, sdp_options=opts)
    for meth in METHODS:
        assert traced.comparison[meth] == pytest.approx(ref.comparison[meth], rel=1e-12)
    assert traced.value.guarantee is ref.value.guarantee
    ref_nodes = {n["name"]: n for n in ref.nodes}
    traced_nodes = {n["name"]: n for n in traced.nodes}
    for key, rec in ref_nodes.items():
        if key.endswith(".shortcut") and key not in traced_nodes:  # traced: the shortcut conv sits in a group
            key = key[: -len(".shortcut")] + (".convShortcut" if name.startswith("wrn") else ".shortcut")
        if rec["role"] is not None or key in traced_nodes:
            got = traced_nodes[key]
            assert got["role"] == rec["role"]
            for meth in METHODS:
                assert got[meth] == pytest.approx(rec[meth], rel=1e-12), (key, meth)
    assert [b["name"] for b in traced.blocks] == [b["name"] for b in ref.blocks]
    assert [s["name"] for s in traced.stages] == [s["name"] for s in ref.stages]


# ---------------------------------------------------------------- registry and activation matching

def test_register_leaf_rules_and_argument_errors():
    class Scaled(nn.Module):
        def forward(self, x):
            return 3.0 * torch.tanh(x)

    lin = nn.Linear(4, 4, bias=False).double()
    model = nn.Sequential(lin, Scaled())
    w = float(torch.linalg.matrix_norm(lin.weight.detach(), 2))
    # traced through (no rule needed): an affine scale 3 after tanh
    assert network_bound(model, (4,), method="product", compare=False).value.value == pytest.approx(3 * w)
    register_leaf(Scaled, lipschitz=lambda m, shape: 3.0 if shape == (4,) else 99.0)
    try:
        nb = network_bound(model, (4,), method="product", compare=False)
        assert nb.value.value == pytest.approx(3 * w) and nb.notes and "Scaled" in nb.notes[0]
        register_leaf(Scaled, lipschitz=5.0)  # replaces the rule
        assert network_bound(model, (4,), method="product", compare=False).value.value == pytest.approx(5 * w)
    finally:
        unregister_leaf(Scaled)
    with pytest.raises(ValueError, match="exactly one"):
        register_leaf(Scaled)
    with pytest.raises(ValueError, match="exactly one"):
        register_leaf(Scaled, lipschitz=1.0, activation="relu")
    with pytest.raises(ValueError, match="unknown activation"):
        register_leaf(Scaled, activation="swishy")
    with pytest.raises(ValueError, match="finite number"):
        register_leaf(Scaled, lipschitz=-1.0)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_leaf(int, lipschitz=1.0)


class Mish(nn.Module):
    def forward(self, x):
        return x * torch.tanh(F.softplus(x))


class ClampReLU(nn.Module):
    def forward(self, x):
        return torch.clamp(x, min=0.0)


class LeakyByWhere(nn.Module):
    def forward(self, x):
        return torch.where(x > 0, x, 0.05 * x)


def test_parameter_free_modules_matching_a_known_activation_are_taken_as_it():
    conv = nn.Conv2d(1, 2, 3, padding=1).double()
    for act, kind, params in ((ClampReLU(), "relu", {}), (LeakyByWhere(), "leaky_relu", {"negative_slope": 0.05})):
        model = nn.Sequential(conv, act, nn.Flatten(), nn.Linear(2 * 16, 2).double())
        root = graph_from_module(model, (1, 4, 4))
        found = [n for n in G.iter_nodes(root) if isinstance(n, G.Activation)]
        assert len(found) == 1 and found[0].kind == kind
        assert found[0].params.get("negative_slope") == pytest.approx(params.get("negative_slope", 0.0)) \
            if params else found[0].params == {}
        assert "matches" not in found[0].note and "equals" in found[0].note
        _check_dominates(model, (1, 4, 4), n_ascent=0)


def test_unmatched_activation_says_how_to_register_it_and_then_works():
    model = nn.Sequential(nn.Linear(3, 3), Mish(), nn.Linear(3, 2)).double()
    with pytest.raises(GraphExtractionError) as err:
        graph_from_module(model, (3,))
    msg = str(err.value)
    assert "\n" not in msg and "Mish" in msg and "register_leaf" in msg and "matches no known activation" in msg
    assert "test_lipschitz_trace.py" in msg  # the source line of the op without a rule
    register_leaf(Mish, lipschitz=1.1)  # sup |mish'| = 1.0998...
    try:
        _check_dominates(model, (3,), n_ascent=1)
    finally:
        unregister_leaf(Mish)


def test_a_wrong_activation_claim_is_caught_by_the_forward_check():
    register_leaf(Mish, activation="silu")
    try:
        with pytest.raises(ValueError, match="does not reproduce"):
            graph_from_module(nn.Sequential(nn.Linear(3, 3), Mish()).double(), (3,))
    finally:
        unregister_leaf(Mish)


# ---------------------------------------------------------------- unsupported ops: one line naming the node

class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


class ChannelMax(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x):
        return torch.max(self.conv(x), 1)[0].flatten(1)


class Attention(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-2, -1) / 2.0, dim=-1)
        return att @ self.v(x)


class NotSeriesParallel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        a = self.a(x)
        return (a + self.b(x)) + torch.relu(a)


class ActiveDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return F.dropout(self.fc(x), 0.5)


@pytest.mark.parametrize("model,shape,pattern", [
    (DataDependent(), (4,), r"torch\.fx cannot trace DataDependent \(test_lipschitz_trace\.py:\d+: if x\.sum\(\) > 0:\)"),
    (ChannelMax(), (1, 4, 4), r"no Lipschitz rule for max \(it returns several tensors\) at node 'max(_\d+)?' "
                              r"\(test_lipschitz_trace\.py:\d+: return torch\.max"),
    (Attention(), (3, 4), r"no Lipschitz rule for matmul of two input-dependent tensors at node 'matmul(_\d+)?' "
                          r"\(test_lipschitz_trace\.py:\d+: return att @ self\.v\(x\)\)"),
    (NotSeriesParallel(), (3,), r"not series-parallel at node 'a' \(test_lipschitz_trace\.py:\d+: a = self\.a\(x\)\)"),
    (ActiveDropout(), (3,), r"dropout with training=True at node 'dropout'.*training=self\.training"),
    (nn.Sequential(nn.Conv2d(1, 1, 3), nn.Upsample(scale_factor=2)), (1, 5, 5), r"module Upsample \('1'\)"),
    (_Lambda(lambda x: x.permute(0, 2, 1).reshape(x.shape[0], -1)), (2, 3), r"no Lipschitz rule for method permute"),
    (_Lambda(lambda x: x * torch.arange(3.0)), (2, 3), r"constant of shape \(3,\) on a tensor of shape \(2, 2, 3\)"),
])
def test_unsupported_ops_raise_one_line_naming_the_node(model, shape, pattern):
    with pytest.raises(GraphExtractionError) as err:
        network_bound(model.eval(), shape)
    msg = str(err.value)
    assert "\n" not in msg and re.search(pattern, msg), msg
    assert "register_leaf" in msg


def test_traced_graph_is_checked_and_input_errors_are_clear():
    with pytest.raises(ValueError, match=r"cannot run on input shape \(4,\)"):
        graph_from_module(nn.Sequential(nn.Linear(3, 2)), (4,))
    with pytest.raises(GraphExtractionError, match="must return one tensor"):
        graph_from_module(_Lambda(lambda x: (x, x)), (3,))
    with pytest.raises(GraphExtractionError, match="more than one input"):
        graph_from_module(_TwoInputs(), (3,))
    # an optional argument is traced with its default
    assert isinstance(graph_from_module(_OptionalFeatures(), (3,)), G.Sequential)


class _TwoInputs(nn.Module):
    def forward(self, x, y):
        return x + y


class _OptionalFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x, return_features=False):
        feats = torch.relu(x)
        return (self.fc(feats), feats) if return_features else self.fc(feats)


def test_training_mode_and_leaf_modules_are_left_as_they_were():
    model = KLResNet().train()
    graph_from_module(model, (1, 6, 6))
    assert all(m.training for m in model.modules())


# ---------------------------------------------------------------- archlip spectral|bound|eval CKPT --model pkg.mod:Class

USER_MODULE = '''
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out += x
        return out


class Net(nn.Module):
    def __init__(self, width=4, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.conv(x))))
        out = F.avg_pool2d(out, 8)
        return self.fc(out.view(out.size(0), -1))
'''


@pytest.fixture
def user_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "usernets.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    net = importlib.import_module("usernets").Net(width=3)
    _randomise_bn(net, seed=11)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "net.pt")
    yield tmp_path / "net.pt", net
    sys.modules.pop("usernets", None)


def test_cli_bound_and_spectral_of_a_user_class(user_checkpoint, capsys):
    from tests.test_cli import run_cli

    ckpt, net = user_checkpoint
    code, out, err = run_cli(capsys, "bound", str(ckpt), "--model", "usernets:Net", "--model-kwargs", '{"width": 3}',
                             "--data", "digits", "--n", "8", "--json")
    assert code == 0, err
    payload = json.loads(out)
    expected = network_bound(net, (1, 8, 8))
    assert payload["certified_lipschitz"] == pytest.approx(min(expected.comparison.values()), rel=1e-6)
    assert list(payload["stage_bounds"]) == ["stage1"] and len(payload["block_bounds"]) == 2
    assert 0 < payload["lower"]["empirical_lipschitz"] <= payload["certified_lipschitz"]
    code, out, err = run_cli(capsys, "spectral", str(ckpt), "--model", f"{ckpt.parent / 'usernets.py'}:Net",
                             "--model-kwargs", '{"width": 3}', "--data", "digits", "--rtol", "0.1", "--json")
    assert code == 0, err
    assert {row["name"] for row in json.loads(out)["layers"]} >= {"conv", "blocks.0.conv1", "fc"}


def test_cli_model_option_errors_are_one_line(user_checkpoint, capsys):
    from tests.test_cli import assert_one_line_error, run_cli

    ckpt, _ = user_checkpoint
    cases = [
        (["--model", "usernets:Net"], ["does not match Net", "missing"]),  # width 4 by default: wrong shapes
        (["--model", "usernets:Nope"], ["has no 'Nope'"]),
        (["--model", "nosuchpackage.mod:Net"], ["cannot import 'nosuchpackage.mod'"]),
        (["--model", "usernets.Net"], ["package.module:Class"]),
        (["--model", "usernets:Net", "--model-kwargs", "{width: 3}"], ["not valid JSON"]),
        (["--model", "usernets:Net", "--model-kwargs", '{"depth": 3}'], ["cannot build usernets:Net"]),
        (["--model-kwargs", '{"width": 3}'], ["--model-kwargs needs --model"]),
    ]
    for extra, needles in cases:
        code, _, err = run_cli(capsys, "bound", str(ckpt), *extra, "--data", "digits", "--n", "0")
        assert_one_line_error(code, err, *needles)
    code, _, err = run_cli(capsys, "eval", "missing.pt", "--model", "usernets:Net", "--data", "digits")
    assert_one_line_error(code, err, "not found")
