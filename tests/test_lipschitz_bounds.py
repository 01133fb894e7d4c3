"""Network bounds: certified >= dense Jacobian norms / data lower bounds; exact for linear nets; rules."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.func import jacrev

from lipschitz import graph as G
from lipschitz.bounds import METHODS, network_bound
from lipschitz.liplt import circular_liplt_terms, conv_spec, dense_linear_term
from lipschitz.lower import attack_ratio_lower, eval_mode, jacobian_norm_lower
from lipschitz.rules import activation_from_module
from spectral.guarantee import Guarantee
from hypothesis import given, settings, strategies as st


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


def _max_jacobian_norm(model: nn.Module, shape, n_points: int = 8, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    with eval_mode(model):
        for _ in range(n_points):
            x = torch.rand(shape, generator=g, dtype=torch.float64)
            j = jacrev(lambda t: model(t[None])[0])(x).detach()
            n_out = j.numel() // x.numel()
            best = max(best, float(torch.linalg.matrix_norm(j.reshape(n_out, -1), ord=2)))
    return best


class PreActNet(nn.Module):
    """A tiny pre-activation residual net written in one forward (traced), with a hand-built graph below."""

    def __init__(self, act=nn.ReLU, c=3):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn3, self.conv3 = nn.BatchNorm2d(c), nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False)
        self.bn4, self.conv4 = nn.BatchNorm2d(2 * c), nn.Conv2d(2 * c, 2 * c, 3, padding=1, bias=False)
        self.short = nn.Conv2d(c, 2 * c, 1, stride=2, bias=False)
        self.bn5, self.pool, self.fc = nn.BatchNorm2d(2 * c), nn.AdaptiveAvgPool2d(1), nn.Linear(2 * c, 4)
        self.act = act()

    def forward(self, x):
        x = self.stem(x)
        x = x + self.conv2(self.act(self.bn2(self.conv1(self.act(self.bn1(x))))))
        a = self.act(self.bn3(x))
        x = self.short(a) + self.conv4(self.act(self.bn4(self.conv3(a))))
        return self.fc(self.pool(self.act(self.bn5(x))).flatten(1))



def _preact_graph(net: PreActNet) -> G.Node:
    """A hand-built graph of PreActNet (graphs built by hand are still accepted by network_bound)."""
    kind, params = activation_from_module(net.act)
    A = lambda: G.Activation(kind, params)  # noqa: E731
    block1 = G.Residual(G.Sequential([G.BatchNorm(net.bn1), A(), G.Layer(net.conv1), G.BatchNorm(net.bn2),
                                      A(), G.Layer(net.conv2)]), None, name="block1", role="block")
    block2 = G.Sequential([G.BatchNorm(net.bn3), A(), G.Residual(
        G.Sequential([G.Layer(net.conv3), G.BatchNorm(net.bn4), A(), G.Layer(net.conv4)]),
        G.Layer(net.short))], name="block2", role="block")
    head = G.Sequential([G.BatchNorm(net.bn5), A(), G.Pool(net.pool), G.Flatten(), G.Layer(net.fc)],
                        name="head", role="head")
    return G.Sequential([G.Layer(net.stem), G.Sequential([block1, block2], name="stage1", role="stage"), head])


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU])
def test_handbuilt_preact_net_bounds_dominate_jacobians(act):
    torch.manual_seed(0)
    model = _randomise_bn(PreActNet(act).double())
    nb = network_bound(_preact_graph(model), (1, 6, 6))
    jac = _max_jacobian_norm(model, (1, 6, 6))
    for meth in METHODS:
        assert nb.comparison[meth] >= jac
    assert nb.comparison["folded+liplt"] <= nb.comparison["folded"] * 1.03 <= nb.comparison["product"] * 1.06
    assert nb.value.guarantee is Guarantee.UPPER and nb.method == "folded+liplt"
    assert [b["name"] for b in nb.blocks] == ["block1", "block2"] and len(nb.stages) == 1
    for blk in nb.blocks:
        assert blk["folded+liplt"] <= blk["product"] * 1.03
        assert blk["guarantee"] == {m: "certified_upper" for m in METHODS}
    assert len(nb.layers) == 7 and all(r.upper >= r.lower > 0 for r in nb.layers if r.upper is not None)
    json.dumps(nb.to_dict())


@pytest.mark.parametrize("name", ["wrn-tiny", "preact-resnet-tiny", "resnet-tiny"])
def test_model_zoo_lower_bounds_below_certified(name):
    import experiments.models as models
    torch.manual_seed(1)
    model = _randomise_bn(models.create_model(name, in_channels=1).double(), seed=2)
    shape = (1, 4, 4)
    nb = network_bound(model, shape)
    x = torch.rand(4, *shape, dtype=torch.float64)
    lo = jacobian_norm_lower(model, x, n_iter=10)
    ratio = attack_ratio_lower(model, x[:2], eps=0.2, steps=3)
    jac = _max_jacobian_norm(model, shape, n_points=2)
    for meth in METHODS:
        assert nb.comparison[meth] >= max(lo.value, ratio.value, jac)
    assert nb.comparison["folded+liplt"] <= nb.comparison["product"]


def test_linear_network_lower_equals_upper_equals_dense_svd():
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(3)
    model = _randomise_bn(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), bn, nn.Conv2d(3, 2, 3, stride=2),
                                        nn.Flatten(), nn.Linear(8, 5)).double())
    shape = (2, 5, 5)
    nb = network_bound(model, shape, method="folded")
    with eval_mode(model):
        j = jacrev(lambda t: model(t[None])[0])(torch.zeros(shape, dtype=torch.float64)).detach()
    exact = float(torch.linalg.matrix_norm(j.reshape(5, -1), ord=2))
    lo = jacobian_norm_lower(model, torch.rand(1, *shape, dtype=torch.float64), n_iter=60, tol=1e-12)
    assert nb.value.value == pytest.approx(exact, rel=1e-8)
    assert nb.value.guarantee is Guarantee.EXACT
    assert lo.value == pytest.approx(exact, rel=1e-6) and lo.value <= nb.value.value
    assert nb.comparison["product"] >= exact


def test_bn_after_conv_and_before_relu_conv_fold_exactly():
    """conv -> BN folds into the conv; BN -> ReLU -> conv folds |scale| into the next conv's inputs."""
    torch.manual_seed(4)
    conv_a, bn_a = nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
    conv_b = nn.Conv2d(3, 2, 3, padding=1, bias=False)
    model = _randomise_bn(nn.Sequential(conv_a, bn_a, nn.ReLU(), conv_b).double(), seed=5)
    nb = network_bound(model, (2, 4, 4), method="folded", compare=False)
    scale = (bn_a.weight / torch.sqrt(bn_a.running_var + bn_a.eps)).detach()
    from spectral.exact import operator_norm_dense
    from spectral.operators import LayerOperator

    wa = conv_a.weight.detach() * scale.view(-1, 1, 1, 1)
    wb = conv_b.weight.detach() * scale.abs().view(1, -1, 1, 1)
    na = operator_norm_dense(LayerOperator.conv(wa, (2, 4, 4), padding=1)).value
    nb_ = operator_norm_dense(LayerOperator.conv(wb, (3, 4, 4), padding=1)).value
    # the BN is folded into conv_a (after a conv) -- so conv_b keeps its raw weight
    raw_b = operator_norm_dense(LayerOperator.conv(conv_b.weight.detach(), (3, 4, 4), padding=1)).value
    assert nb.value.value == pytest.approx(na * raw_b, rel=1e-9)
    # pre-activation form: BN -> ReLU -> conv folds |scale| into conv_b's inputs
    pre = _randomise_bn(nn.Sequential(bn_a, nn.ReLU(), conv_b).double(), seed=5)
    nb2 = network_bound(pre, (3, 4, 4), method="folded", compare=False)
    assert nb2.value.value == pytest.approx(nb_, rel=1e-9)
    assert nb2.value.value <= float(scale.abs().max()) * raw_b * (1 + 1e-9)
    assert nb2.value.value >= _max_jacobian_norm(pre, (3, 4, 4))


def test_residual_rules_identity_and_projection():
    torch.manual_seed(6)
    conv = nn.Conv2d(2, 2, 3, padding=1, bias=False).double()
    short = nn.Conv2d(2, 2, 1, bias=False).double()
    from spectral.exact import operator_norm_dense
    from spectral.operators import LayerOperator

    nconv = operator_norm_dense(LayerOperator.from_module(conv, (2, 4, 4))).value
    nshort = operator_norm_dense(LayerOperator.from_module(short, (2, 4, 4))).value
    ident = network_bound(G.Residual(G.Layer(conv)), (2, 4, 4), method="product", compare=False)
    assert ident.value.value == pytest.approx(1 + nconv, rel=1e-9)
    proj = network_bound(G.Residual(G.Layer(conv), G.Layer(short)), (2, 4, 4), method="product", compare=False)
    assert proj.value.value == pytest.approx(nshort + nconv, rel=1e-9)


def test_post_activation_block_merged_liplt_dominates_jacobian():
    torch.manual_seed(7)
    c1, c2 = nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.Conv2d(3, 2, 3, padding=1, bias=False)
    bn1, bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(2)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.bn1, self.bn2 = c1, c2, bn1, bn2

        def forward(self, x):
            return torch.relu(x + self.bn2(self.c2(torch.relu(self.bn1(self.c1(x))))))

    model = _randomise_bn(Block().double(), seed=8)
    nb = network_bound(model, (2, 5, 5))
    assert nb.comparison["folded+liplt"] < nb.comparison["folded"]
    assert nb.comparison["folded+liplt"] >= _max_jacobian_norm(model, (2, 5, 5), n_points=12)


@pytest.mark.parametrize("stride,mode,shortcut", [(1, "zeros", None), (2, "zeros", "conv"), (1, "zeros", "identity"),
                                                   (1, "circular", "identity"), (2, "circular", "conv")])
def test_circular_liplt_term_bounds_dense_and_is_exact_for_circular(stride, mode, shortcut):
    torch.manual_seed(9)
    cin = 3
    c1 = nn.Conv2d(cin, 4, 3, stride=stride, padding=1, bias=False, padding_mode=mode).double()
    c2 = nn.Conv2d(4, cin if shortcut == "identity" else 5, 3, padding=1, bias=False, padding_mode=mode).double()
    n = 6
    d1, d2 = torch.rand(cin, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    s1 = conv_spec(c1, (cin, n, n), d1, d2)
    s2 = conv_spec(c2, (4, n // stride, n // stride))
    sc = shortcut
    if shortcut == "conv":
        sc = conv_spec(nn.Conv2d(cin, 5, 1, stride=stride, bias=False, padding_mode=mode).double(), (cin, n, n), d1)
    dense = dense_linear_term(s1, s2, 0.5, (cin, n, n), sc)
    circ = circular_liplt_terms(s1, s2, 0.5, sc)["bound"]
    assert circ >= dense * (1 - 1e-12)
    if mode == "circular":
        assert circ == pytest.approx(dense, rel=1e-8)


def test_normalize_node_folds_into_first_layer():
    torch.manual_seed(10)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
    std = torch.tensor([0.5, 0.25], dtype=torch.float64)
    graph = G.Sequential([G.Normalize(torch.zeros(2, dtype=torch.float64), std), G.Layer(conv)])
    folded = network_bound(graph, (2, 4, 4), method="folded", compare=False).value.value
    product = network_bound(graph, (2, 4, 4), method="product", compare=False).value.value
    from spectral.exact import operator_norm_dense
    from spectral.operators import LayerOperator

    exact = operator_norm_dense(LayerOperator.conv(conv.weight.detach() / std.view(1, -1, 1, 1), (2, 4, 4),
                                                   padding=1)).value
    raw = operator_norm_dense(LayerOperator.conv(conv.weight.detach(), (2, 4, 4), padding=1)).value
    assert folded == pytest.approx(exact, rel=1e-9)
    assert product == pytest.approx(4.0 * raw, rel=1e-9) and product >= folded  # 1 / min std = 4


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="Upsample"):
        network_bound(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Upsample(scale_factor=2)), (1, 5, 5))
    with pytest.raises(ValueError, match="method"):
        network_bound(nn.Sequential(nn.Linear(3, 2)), (3,), method="best")

    class DoubledReLU(nn.Module):  # registered as a plain ReLU, which it is not
        def forward(self, x):
            return 2 * torch.relu(x)

    from lipschitz.trace import register_leaf, unregister_leaf

    register_leaf(DoubledReLU, activation="relu")
    try:
        with pytest.raises(ValueError, match="does not reproduce"):
            network_bound(nn.Sequential(nn.Linear(3, 2), DoubledReLU()), (3,))
    finally:
        unregister_leaf(DoubledReLU)
    with pytest.raises(ValueError, match="shape"):
        network_bound(nn.Sequential(nn.Linear(3, 2)), (4,))


def test_training_mode_is_restored_and_json_written(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Dropout(0.5), nn.Linear(3, 2))
    model.train()
    nb = network_bound(model, (4,))
    assert model.training and model[1].training
    path = nb.to_json(tmp_path / "bound.json")
    data = json.loads(path.read_text())
    assert data["value"]["guarantee"] == "certified_upper" and set(data["comparison"]) == set(METHODS)
    assert math.isfinite(data["value"]["value"])


ACT_MODULES = {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.1), "silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def _random_sequential(act, n, pool, seed):
    torch.manual_seed(seed)
    pools = {"max": nn.MaxPool2d(2, stride=1), "avg": nn.AvgPool2d(3, stride=1, padding=1), "none": nn.Identity()}
    body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), ACT_MODULES[act](), pools[pool],
                         nn.Conv2d(3, 2, 3, stride=2), nn.BatchNorm2d(2), ACT_MODULES[act]())
    with torch.no_grad():
        out = body.eval()(torch.zeros(1, 1, n, n)).numel()
    return nn.Sequential(*body, nn.Flatten(), nn.Linear(out, 3))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), act=st.sampled_from(sorted(ACT_MODULES)), n=st.sampled_from([4, 5, 6]),
       kind=st.sampled_from(["preact", "seq-max", "seq-avg", "seq-none"]))
def test_property_certified_bounds_dominate_jacobians(seed, act, n, kind):
    if kind == "preact":
        torch.manual_seed(seed)
        model = PreActNet(lambda: ACT_MODULES[act](), c=2)
    else:
        model = _random_sequential(act, n, kind.split("-")[1], seed)
    model = _randomise_bn(model.double(), seed=seed)
    nb = network_bound(model, (1, n, n))
    jac = _max_jacobian_norm(model, (1, n, n), n_points=4, seed=seed)
    for meth in METHODS:
        assert nb.comparison[meth] >= jac * (1 - 1e-9)
    assert nb.comparison["folded+liplt"] <= nb.comparison["folded"] * 1.03
    assert nb.comparison["folded"] <= nb.comparison["product"] * 1.03


def _aligned_rank_one(c_in, c_mid, c_out, seed):
    """Non-negative rank-one weights W1 = u v^T, W2 = v u^T: W2 W1 = |u|^2 v v^T is PSD with norm
    ||W2|| ||W1||, so LipLT is tight for the pair and for the identity residual around it."""
    g = torch.Generator().manual_seed(seed)
    u, v = (torch.rand(k, generator=g, dtype=torch.float64) + 0.1 for k in (c_mid, c_in))
    assert c_in == c_out
    return torch.outer(u, v), torch.outer(v, u)


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("dense_max_entries", [2**21, 0])
def test_liplt_is_tight_on_aligned_layers(conv, dense_max_entries):
    """On positive inputs all ReLUs are active, so the Jacobian is W2 W1 (or I + W2 W1): the bound is attained."""
    w1, w2 = _aligned_rank_one(3, 4, 3, seed=11)
    if conv:
        l1, l2 = nn.Conv2d(3, 4, 1, bias=False).double(), nn.Conv2d(4, 3, 1, bias=False).double()
        shape = (3, 3, 3)
    else:
        l1, l2 = nn.Linear(3, 4, bias=False).double(), nn.Linear(4, 3, bias=False).double()
        shape = (3,)
    with torch.no_grad():
        l1.weight.copy_(w1.view(l1.weight.shape))
        l2.weight.copy_(w2.view(l2.weight.shape))
    seq = G.Sequential([G.Layer(l1), G.Activation("relu"), G.Layer(l2)])
    res = G.Residual(G.Sequential([G.Layer(l1), G.Activation("relu"), G.Layer(l2)]))
    prod = float(torch.linalg.matrix_norm(w2 @ w1, ord=2))
    ident = float(torch.linalg.matrix_norm(torch.eye(3, dtype=torch.float64) + w2 @ w1, ord=2))
    kw = dict(method="folded+liplt", compare=False, dense_max_entries=dense_max_entries)
    got_seq = network_bound(seq, shape, **kw).value.value
    got_res = network_bound(res, shape, **kw).value.value
    assert got_seq >= prod * (1 - 1e-9) and got_seq == pytest.approx(prod, rel=2e-2)
    assert got_res >= ident * (1 - 1e-9) and got_res == pytest.approx(ident, rel=2e-2)
    # ... and these are attained Lipschitz constants: Jacobian at a positive input
    model = nn.Sequential(l1, nn.ReLU(), l2)
    assert _max_jacobian_norm(model, shape, n_points=1) == pytest.approx(prod, rel=1e-9)


@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.0), nn.Tanh()])
def test_activation_after_a_layer_is_not_labelled_exact(act):
    """x -> relu([x, -x]) is 1-Lipschitz while ||W|| = sqrt(2): the product is an upper bound, not exact."""
    lin = nn.Linear(1, 2, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0], [-1.0]], dtype=torch.float64))
    for meth in METHODS:
        nb = network_bound(nn.Sequential(lin, act), (1,), method=meth, compare=False)
        assert nb.value.value == pytest.approx(2**0.5)
        assert nb.value.guarantee is Guarantee.UPPER
    # max pooling after a layer: max(x, -x) = |x| is 1-Lipschitz, the conv alone has norm sqrt(2)
    conv = nn.Conv1d(1, 1, 2, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[-1.0, 1.0]]], dtype=torch.float64))
    for meth in METHODS:
        nb = network_bound(nn.Sequential(conv, nn.MaxPool1d(2)), (1, 1), method=meth, compare=False)
        assert nb.value.value == pytest.approx(2**0.5)
        assert nb.value.guarantee is Guarantee.UPPER
    # an activation on the range of an earlier one: relu(-relu(x0) - 1) = 0, so W o relu o BN o relu is only
    # |s1|-Lipschitz in x1 while the product is ||W diag|d||| (it was labelled exact)
    bn = nn.BatchNorm1d(2).double().eval()
    lin2 = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([-1.0, 1.0], dtype=torch.float64))
        bn.bias.copy_(torch.tensor([-1.0, 0.0], dtype=torch.float64))
        lin2.weight.fill_(1.0)
    model = nn.Sequential(nn.ReLU(), bn, nn.ReLU(), lin2).eval()
    for meth in METHODS:
        nb = network_bound(model, (2,), method=meth, compare=False)
        assert nb.value.value >= float(bn.weight[1] / torch.sqrt(bn.running_var[1] + bn.eps))
        assert nb.value.guarantee is Guarantee.UPPER


@pytest.mark.parametrize("sc_mode", ["zeros", "reflect", "replicate"])
def test_circular_liplt_refuses_a_padded_non_circular_shortcut(sc_mode):
    """circular convs with a zero/reflect/replicate-padded 3x3 shortcut: the circular symbol of the shortcut
    is not the shortcut, so the circular route must refuse (it under-estimated the dense term by up to 20%)."""
    torch.manual_seed(0)
    shape = (1, 3, 3)
    c1 = nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular", bias=False).double()
    c2 = nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular", bias=False).double()
    sc = nn.Conv2d(1, 1, 3, padding=1, padding_mode=sc_mode, bias=False).double()
    s1, s2, s3 = conv_spec(c1, shape), conv_spec(c2, shape), conv_spec(sc, shape)
    with pytest.raises(ValueError, match="shortcut"):
        circular_liplt_terms(s1, s2, 0.5, s3)
    # an unpadded 1x1 shortcut is its own circular version: still accepted and certified
    sc1 = nn.Conv2d(1, 1, 1, bias=False).double()
    s4 = conv_spec(sc1, shape)
    bound = circular_liplt_terms(s1, s2, 0.5, s4)["bound"]
    assert bound >= dense_linear_term(s1, s2, 0.5, shape, s4) * (1 - 1e-12)


def test_batchnorm1d_beside_a_linear_on_2d_input_is_not_folded_into_its_features():
    """Linear on (L, F) with BatchNorm1d(L == F): the BN scales rows (dim 0), not the weight's features."""
    lin = nn.Linear(4, 4, bias=False).double()
    bn = nn.BatchNorm1d(4).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([5.0, 0.1, 0.1, 0.1], dtype=torch.float64))
    for model in (nn.Sequential(lin, bn), nn.Sequential(bn, lin), nn.Sequential(bn, nn.ReLU(), lin)):
        model.eval()
        shape = (4, 4)
        jac = jacrev(lambda t: model(t[None])[0])(torch.full(shape, 3.0, dtype=torch.float64)).reshape(16, 16)
        true = float(torch.linalg.matrix_norm(jac, ord=2))
        nb = network_bound(model, shape, compare=True)
        for meth, value in nb.comparison.items():
            assert value >= true * (1 - 1e-9), (meth, value, true)


def test_norm_one_avg_pool_beside_a_layer_is_not_labelled_exact():
    """AvgPool1d(2, 3, 1, count_include_pad=False) on L=7 averages [x0], [x2, x3], [x5, x6]: norm 1, but
    x -> w . pool(x) with w = (0, 1, 1) is 1-Lipschitz while ||w|| = sqrt(2) (it was labelled exact)."""
    lin = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64))
    model = nn.Sequential(nn.AvgPool1d(2, 3, 1, count_include_pad=False), nn.Flatten(), lin)
    for meth in METHODS:
        nb = network_bound(model, (1, 7), method=meth, compare=False)
        assert nb.value.value >= 1.0 - 1e-12
        assert nb.value.guarantee is Guarantee.UPPER


def test_network_bound_takes_an_example_tensor_as_well_as_a_shape():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3 * 5 * 5, 4)).eval()
    by_shape = network_bound(net, (1, 5, 5), compare=False)
    x = torch.rand(3, 1, 5, 5)
    by_tensor = network_bound(net, x, compare=False)
    assert by_tensor.input_shape == (1, 5, 5) == by_shape.input_shape
    assert by_tensor.value.value == by_shape.value.value
    from spectral.sandwich import SandwichOptions
    opts = network_bound(net, (1, 5, 5), compare=False, sandwich_kwargs={"options": SandwichOptions(lower_iters=6)})
    kw = network_bound(net, (1, 5, 5), compare=False, sandwich_kwargs={"lower_iters": 6})
    assert opts.value.value == kw.value.value


def test_network_bound_reuses_matching_analyze_rows_and_recomputes_stale_ones():
    from spectral.analyze import analyze

    torch.manual_seed(3)
    net = _randomise_bn(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(36, 5)).double(), seed=3)
    kw = {"dense_max_entries": 2**20}

    def same(a, b):  # everything but the timings
        assert a.comparison == b.comparison and a.nodes == b.nodes and a.notes == b.notes
        assert [r.bound_dict() for r in a.layers] == [r.bound_dict() for r in b.layers]

    table = analyze(net, (2, 6, 6), progress=False, rtol=0.05, **kw)
    reused = network_bound(net, (2, 6, 6), rtol=0.05, sandwich_kwargs=kw, layer_results=table)
    same(reused, network_bound(net, (2, 6, 6), rtol=0.05, sandwich_kwargs=kw))
    rows = {r.name: r for r in reused.layers}
    # conv "0" has a BatchNorm folded into its analyze row: another operator, sandwiched by network_bound itself
    assert rows["3"].result is table["3"].result and rows["6"].result is table["6"].result
    assert rows["0"].result is not table["0"].result
    # another rtol, or weights changed since the analysis: recomputed and said so, never the stale numbers
    other_rtol = network_bound(net, (2, 6, 6), rtol=0.1, sandwich_kwargs=kw, layer_results=table)
    assert "recomputed" in other_rtol.notes[-1] and rows["3"].result is not {r.name: r for r in other_rtol.layers}["3"].result
    with torch.no_grad():
        net[3].weight.mul_(2.0)
    stale = network_bound(net, (2, 6, 6), rtol=0.05, sandwich_kwargs=kw, layer_results=table)
    fresh = network_bound(net, (2, 6, 6), rtol=0.05, sandwich_kwargs=kw)
    assert stale.notes[-1].startswith("layer_results of 3 were computed for other weights")
    stale.notes.pop()
    same(stale, fresh)
    assert fresh.comparison["product"] > reused.comparison["product"] * 1.5
