"""LipSDP chain elimination (lipschitz.sdp), dense lowering and local certificates (lipschitz.local):
certified >= dense Jacobian norms, = ECLipsE-Fast at the greedy multipliers, verified PSD checks refuse
indefinite matrices, local constants >= Jacobians inside the ball, certified radii survive attacks."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.func import jacrev

from lipschitz.bounds import graph_from_module, interpret, network_bound
from lipschitz.dense import lower
from lipschitz.local import certified_radius, local_bound
from lipschitz.sdp import chain_bound, verify_psd
from tests.test_lipschitz_bounds import ACT_MODULES, PreActNet, _max_jacobian_norm, _randomise_bn


def _mlp(dims, act=nn.ReLU, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double().eval()


def _program(model, shape):
    g = graph_from_module(model, shape)
    shapes = {}
    interpret(g, torch.zeros((1,) + shape, dtype=torch.float64), shapes)
    return lower(g, shapes)


def _eclipse_fast(weights):
    """ECLipsE-Fast (Xu & Sivaranjani 2024) for ReLU, written from the paper's recursion (test reference)."""
    X = torch.eye(weights[0].shape[1], dtype=torch.float64)
    for W in weights[:-1]:
        M = W @ torch.linalg.inv(X) @ W.T
        lam = 1 / (2 * 0.25 * float(torch.linalg.eigvalsh(M)[-1]))
        X = lam * torch.eye(W.shape[0], dtype=torch.float64) - lam**2 * 0.25 * M
    W = weights[-1]
    return math.sqrt(float(torch.linalg.eigvals(W.T @ W @ torch.linalg.inv(X)).real.max()))


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_greedy_chain_is_eclipse_fast_and_optimisation_only_improves(depth):
    model = _mlp([12] + [16] * (depth - 1) + [4], seed=depth)
    ws = [m.weight.detach() for m in model if isinstance(m, nn.Linear)]
    res = chain_bound(_program(model, (12,)), iters=25)
    assert res.greedy == pytest.approx(_eclipse_fast(ws), rel=1e-9)
    fast_only = chain_bound(_program(model, (12,)), iters=0)
    assert fast_only.value == pytest.approx(_eclipse_fast(ws), rel=1e-5)
    assert res.value <= res.greedy * (1 + 1e-5)
    assert res.value >= res.estimate
    assert res.value >= _max_jacobian_norm(model, (12,), n_points=16) * (1 - 1e-12)


def test_linear_program_is_its_exact_norm():
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 3)).double()
    res = chain_bound(_program(model, (6,)))
    exact = float(torch.linalg.matrix_norm((model[1].weight @ model[0].weight).detach(), ord=2))
    assert exact <= res.value <= exact * (1 + 1e-5)


def test_verify_psd_refuses_indefinite_and_accepts_definite():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(30, 30, generator=g, dtype=torch.float64)
    P = B @ B.T + 1e-3 * torch.eye(30, dtype=torch.float64)
    assert verify_psd(P, 0.0)
    v = torch.linalg.eigh(P).eigenvectors[:, 0]
    lam0 = float(torch.linalg.eigvalsh(P)[0])
    assert not verify_psd(P - (lam0 + 1e-9) * torch.outer(v, v) - 1e-9 * torch.eye(30, dtype=torch.float64), 0.0)
    assert not verify_psd(P, 2 * lam0)  # an allowance larger than the margin cannot be covered


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), act=st.sampled_from(sorted(ACT_MODULES)),
       kind=st.sampled_from(["mlp", "preact", "conv"]))
def test_property_lipsdp_dominates_jacobians(seed, act, kind):
    if kind == "mlp":
        model, shape = _mlp([5, 7, 6, 3], ACT_MODULES[act], seed), (5,)
    elif kind == "preact":
        torch.manual_seed(seed)
        model, shape = _randomise_bn(PreActNet(lambda: ACT_MODULES[act](), c=2).double(), seed), (1, 4, 4)
    else:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), ACT_MODULES[act](),
                              nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3))
        model, shape = _randomise_bn(model.double(), seed), (1, 4, 4)
    nb = network_bound(model, shape, method="lipsdp", compare=False)
    jac = _max_jacobian_norm(model, shape, n_points=8, seed=seed)
    assert nb.comparison["lipsdp"] >= jac * (1 - 1e-9)
    assert nb.comparison["lipsdp"] <= nb.comparison["folded+liplt"]


def _jacobian_norms_in_ball(model, x, eps, n, seed):
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(n):
        d = torch.randn(x.shape, generator=g, dtype=torch.float64)
        d = d / d.norm() * eps * float(torch.rand(1, generator=g, dtype=torch.float64))
        xp = (x + d).clamp(0, 1)
        J = jacrev(lambda t: model(t[None])[0])(xp).reshape(-1, x.numel())
        best = max(best, float(torch.linalg.matrix_norm(J, ord=2)))
    return best


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), eps=st.sampled_from([0.02, 0.2, 1.0]), norm=st.sampled_from(["l2", "linf"]))
def test_property_local_bound_dominates_jacobians_in_the_ball(seed, eps, norm):
    model = _mlp([6, 10, 10, 3], nn.ReLU, seed)
    x = torch.rand(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lb = local_bound(model, x, eps, norm)
    # Jacobians sampled in the l2 ball of radius eps, which lies inside both balls
    assert lb.value >= _jacobian_norms_in_ball(model, x, eps, 12, seed) * (1 - 1e-9)
    assert lb.unstable <= lb.neurons


def test_stable_relus_are_substituted():
    model = _mlp([4, 8, 3], nn.ReLU, 1)
    x = torch.rand(4, dtype=torch.float64)
    tiny = local_bound(model, x, 1e-6, "l2")
    assert tiny.unstable == 0  # all pre-activations keep their sign on a tiny ball: a linear map
    W1, W2 = model[0].weight.detach(), model[2].weight.detach()
    D = torch.diag((model[0](x) > 0).double()).detach()
    exact = float(torch.linalg.matrix_norm(W2 @ D @ W1, ord=2))
    assert exact * (1 - 1e-9) <= tiny.value <= exact * (1 + 1e-5)


def test_certified_radius_survives_a_pgd_attack():
    from experiments.attacks import pgd

    model = _mlp([6, 12, 12, 3], nn.ReLU, 3)
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(6, 6, generator=g, dtype=torch.float64)
    labels = model(xs).argmax(1)
    for i in range(len(xs)):
        res = certified_radius(model, xs[i], int(labels[i]), "l2", eps_max=2.0, steps=5, index=i)
        assert res.certified_radius >= 0 and res.checked_eps >= res.certified_radius
        if res.certified_radius > 0:
            adv = pgd(model, xs[i:i + 1], labels[i:i + 1], eps=res.certified_radius * 0.999, norm="l2", steps=40,
                      step_size=res.certified_radius / 8, generator=torch.Generator().manual_seed(i))
            assert int(model(adv).argmax(1)) == int(labels[i])
    assert certified_radius(model, xs[0], (int(labels[0]) + 1) % 3).certified_radius == 0.0


@pytest.mark.parametrize("shape", [(40, 6, 5), (200, 16, 24), (3, 9, 9)])
def test_certified_max_singular_value_matches_eigvalsh(shape):
    from lipschitz.liplt import _max_sv

    g = torch.Generator().manual_seed(sum(shape))
    blocks = torch.complex(torch.randn(shape, generator=g, dtype=torch.float64),
                           torch.randn(shape, generator=g, dtype=torch.float64))
    blocks[7 % shape[0]] *= 1.0 + 1e-7  # a near-tie between blocks
    exact = float(torch.linalg.matrix_norm(blocks, ord=2).max())
    got = _max_sv(blocks)
    assert exact * (1 - 1e-12) <= got <= exact * (1 + 1e-8)  # callers add ROUNDOFF_MARGIN (1e-9)


def test_circular_norm_cache_gives_the_same_terms():
    from lipschitz.liplt import circular_liplt_terms, conv_spec

    torch.manual_seed(0)
    c1, c2, sc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
    s1, s2, s3 = conv_spec(c1, (3, 6, 6)), conv_spec(c2, (4, 6, 6)), conv_spec(sc, (3, 6, 6))
    cache: dict = {}
    for shortcut in (None, s3, None, s3):
        with_cache = circular_liplt_terms(s1, s2, 0.5, shortcut, cache=cache)
        plain = circular_liplt_terms(s1, s2, 0.5, shortcut)
        assert with_cache["bound"] == plain["bound"] and with_cache["c1"] == plain["c1"]
    norms = [k for k in cache if k != "liplt_terms"]
    assert len(norms) == 2 and len(cache["liplt_terms"]) == 2  # ||C1||, ||C2||; the pair with/without shortcut
