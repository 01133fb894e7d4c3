"""Node values of network_bound: each named node's value bounds the Lipschitz constant of that node's own
sub-map (not the node composed with a channel scaling folded in from before it), for every method."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.func import jacrev

from lipschitz import graph as G
from lipschitz.bounds import METHODS, interpret, network_bound
from lipschitz.trace import graph_from_module
from lipschitz.lower import attack_ratio_lower, eval_mode
from lipschitz.search import NodeMap, node_inputs


def _spread_bn(model: nn.Module, seed: int) -> nn.Module:
    """BN scales of both signs over three decades (0.01 .. 10): folding a small one into a node hides it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                sign = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0).to(m.weight.dtype)
                m.weight.copy_(sign * 10 ** (torch.rand(c, generator=g, dtype=m.weight.dtype) * 3 - 2))
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


def _own_lipschitz_lower(node: G.Node, holder: nn.Module, inputs: torch.Tensor, seed: int) -> float:
    """max of the jacrev Jacobian norm of ``node`` alone at its network inputs, perturbed and random points,
    and of the attack ratio ascended from those inputs: every one is a lower bound of L(node)."""
    g = torch.Generator().manual_seed(seed)
    scale = float(inputs.std()) + 1e-3
    points = torch.cat([inputs, inputs + 0.3 * scale * torch.randn(inputs.shape, generator=g, dtype=inputs.dtype),
                        scale * torch.randn(inputs.shape, generator=g, dtype=inputs.dtype)])
    best = 0.0
    for x in points:
        j = jacrev(lambda t: interpret(node, t[None])[0])(x).detach()
        best = max(best, float(torch.linalg.matrix_norm(j.reshape(-1, x.numel()), ord=2)))
    ratio = attack_ratio_lower(NodeMap(node, holder), inputs, eps=scale, steps=8, clip=None, seed=seed)
    return max(best, ratio.value)


def _check_every_node(model: nn.Module, shape: tuple, seed: int) -> int:
    """Every named node's value (each method) >= the largest observed Jacobian norm / ratio of its own map."""
    nb = network_bound(model, shape)
    root = graph_from_module(model, shape)
    by_name = {n.name: n for n in G.iter_nodes(root) if isinstance(n, (G.Sequential, G.Residual)) and n.name}
    inputs: dict[int, torch.Tensor] = {}
    g = torch.Generator().manual_seed(seed)
    checked = 0
    with eval_mode(model), torch.no_grad():
        node_inputs(root, torch.rand((2,) + shape, generator=g, dtype=torch.float64), inputs)
    with eval_mode(model):
        for rec in nb.nodes:
            node = by_name[rec["name"]]
            lower = _own_lipschitz_lower(node, model, inputs[id(node)], seed)
            for meth in METHODS:
                assert rec[meth] >= lower * (1 - 1e-9), (rec["name"], meth, rec[meth], lower)
                if rec["guarantee"][meth] == "exact":
                    assert rec[meth] == pytest.approx(lower, rel=1e-6), (rec["name"], meth)
            checked += 1
    return checked


# ----------------------------------------------------------------------------- the reproducers

def test_node_after_a_small_batchnorm_is_the_node_alone():
    """BN(0.01) then a nested Sequential: node "1" was 0.00884 labelled exact; it is ||inner conv||."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(2).double().eval()
    with torch.no_grad():
        bn.weight.fill_(0.01)
        bn.running_var.fill_(1.0)
    inner = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, bias=False)).double()
    model = nn.Sequential(bn, inner).eval()
    nb = network_bound(model, (2, 6, 6))
    j = jacrev(lambda t: inner(t[None])[0])(torch.zeros(2, 6, 6, dtype=torch.float64)).detach().reshape(72, 72)
    own = float(torch.linalg.matrix_norm(j, ord=2))
    (node,) = nb.nodes
    for meth in METHODS:
        assert node[meth] == pytest.approx(own, rel=1e-9) and node["guarantee"][meth] == "exact"
    # the network value still folds the BN into the conv: about 0.01 * ||conv||
    assert nb.value.value <= 0.011 * own


def test_preactivation_projection_block_nodes_are_their_own_maps():
    """wrn-tiny with bn1 = 0.01 in the first block: .residual was 0.0847 / 0.0615 (certified_upper) while the
    Jacobian norm of a -> convShortcut(a) + conv2(act2(bn2(conv1(a)))) reaches 4.0."""
    from experiments.models import create_model

    torch.manual_seed(0)
    model = create_model("wrn-tiny", in_channels=1).double().eval()
    with torch.no_grad():
        model.blocks[0].layer[0].bn1.weight.fill_(0.01)
    nb = network_bound(model, (1, 8, 8))
    rec = {n["name"]: n for n in nb.nodes}["blocks.0.layer.0.residual"]
    blk = model.blocks[0].layer[0]

    def residual(a):
        return blk.convShortcut(a) + blk.conv2(blk.act2(blk.bn2(blk.conv1(a))))

    x = torch.rand(1, 8, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    j = jacrev(lambda t: residual(t[None])[0])(x[0]).detach().reshape(-1, x[0].numel())
    own = float(torch.linalg.matrix_norm(j, ord=2))
    assert own > 1.0
    for meth in METHODS:
        assert rec[meth] >= own
    # ... while the block (bn1 -> act1 -> residual) keeps the small scale folded in
    blk_rec = {n["name"]: n for n in nb.nodes}["blocks.0.layer.0"]
    assert blk_rec["folded+liplt"] < 0.2 * rec["folded+liplt"]


def test_stem_after_input_normalisation_is_the_stem_conv():
    """normalize std 2: the stem was reported as ||stem_conv|| / 2 labelled exact."""
    from experiments.models import create_model
    from spectral.exact import operator_norm_dense
    from spectral.operators import LayerOperator

    torch.manual_seed(0)
    model = create_model("wrn-tiny", in_channels=1, normalize=((0.5,), (2.0,))).double().eval()
    nb = network_bound(model, (1, 8, 8))
    stem = {n["name"]: n for n in nb.nodes}["stem"]
    own = operator_norm_dense(LayerOperator.from_module(model.stem_conv, (1, 8, 8))).value
    for meth in METHODS:
        assert stem[meth] == pytest.approx(own, rel=1e-9) and stem["guarantee"][meth] == "exact"


def test_folding_still_tightens_the_network_value():
    """Node values are the nodes alone; the whole-network value still folds across node boundaries."""
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(2).double()
    model = _spread_bn(nn.Sequential(bn, nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, bias=False))).double(), 3)
    nb = network_bound(model, (2, 5, 5))
    scale = float((bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs().max())
    assert nb.comparison["folded"] < nb.comparison["product"]
    assert nb.comparison["product"] == pytest.approx(scale * nb.nodes[0]["product"], rel=1e-9)


# -------------------------------------------------------------------- property: every node, random nets

def _nested_sequential(seed: int, act: str) -> nn.Module:
    torch.manual_seed(seed)
    a = {"relu": nn.ReLU, "silu": nn.SiLU, "leaky": lambda: nn.LeakyReLU(0.2)}[act]
    return nn.Sequential(
        nn.BatchNorm2d(2),
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), a(),
                      nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3))),
        a(),
        nn.Sequential(nn.BatchNorm2d(3), a(), nn.Conv2d(3, 2, 3, stride=2, padding=1)),
        nn.Flatten(), nn.Linear(2 * 3 * 3, 3),
    )


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10**6), family=st.sampled_from(["wrn", "preact", "resnet", "nested"]),
       act=st.sampled_from(["relu", "silu"]), normalize=st.booleans(), stride=st.sampled_from([1, 2]))
def test_property_every_node_bounds_its_own_jacobian(seed, family, act, normalize, stride):
    from experiments.models.resnet import PreActResNet, ResNet
    from experiments.models.wideresnet import WideResNet

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    norm = ((0.5,), (float(torch.rand(1, generator=g)) * 2 + 0.2,)) if normalize else None
    if family == "wrn":
        model = WideResNet(depths=(2, 1), widths=(2, 3, 4), strides=(stride, 2), num_classes=3, activation=act,
                           in_channels=1, normalize=norm)
        shape = (1, 4, 4)
    elif family == "nested":
        model, shape = _nested_sequential(seed, "leaky" if act == "silu" else act), (2, 6, 6)
    else:
        cls = PreActResNet if family == "preact" else ResNet
        model = cls(num_blocks=(1, 1, 1, 1), widths=(2, 3, 3, 4), num_classes=3, activation=act, in_channels=1,
                    normalize=norm)
        shape = (1, 4, 4)
    model = _spread_bn(model.double(), seed)
    assert _check_every_node(model, shape, seed) >= 2
