"""Searched lower bounds: Jacobian-norm ascent, ratio search, per-node lower bounds.

Ground truths: closed forms (linear maps, a tanh unit, a ReLU corner), dense jacrev Jacobians at the
reported points, certified network bounds (upper >= searched >= data)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.func import jacrev

from lipschitz import graph as G
from lipschitz.bounds import METHODS, network_bound
from lipschitz.trace import graph_from_module
from lipschitz.lower import eval_mode, jacobian_norm_lower
from lipschitz.search import (LowerSearchResult, jacobian_norm_search, lower_bound_search, node_lower_bounds,
                              ratio_search)
from spectral.guarantee import Guarantee

FAST = {"n_random": 8, "attack_points": 2, "attack_steps": 3, "per_source": 2, "steps": 6}


def _jacobian_at(model: nn.Module, point: torch.Tensor) -> torch.Tensor:
    """The float64 Jacobian (out, in) of the model at ``point`` (a float64 copy for other dtypes)."""
    twin = copy.deepcopy(model).double()
    with eval_mode(twin):
        p = point.detach().double()
        j = jacrev(lambda t: twin(t[None])[0])(p).detach()
    return j.reshape(-1, p.numel())


def _check_witness(res: LowerSearchResult, model: nn.Module, clip=(0.0, 1.0)) -> None:
    """The reported point lies in the box and its dense Jacobian norm (and ||J v||) is >= the value."""
    (point,) = res.points
    if clip is not None:
        assert float(point.min()) >= clip[0] and float(point.max()) <= clip[1]
    j = _jacobian_at(model, point)
    assert res.value.value <= float(torch.linalg.matrix_norm(j, ord=2))
    jv = float(torch.linalg.vector_norm(j @ res.vector.reshape(-1)))
    assert res.value.value <= jv and res.value.value == pytest.approx(jv, rel=1e-9)
    assert res.value.guarantee is Guarantee.LOWER


def test_linear_model_search_is_the_weight_norm():
    torch.manual_seed(0)
    lin = nn.Linear(10, 4)
    w = float(torch.linalg.matrix_norm(lin.weight.detach().double(), ord=2))
    res = jacobian_norm_search(lin, torch.rand(5, 10), **FAST)
    assert res.value.value <= w and res.value.value == pytest.approx(w, rel=1e-6)
    _check_witness(res, lin)
    rat = ratio_search(lin, torch.rand(5, 10), steps=20)
    assert rat.value.value <= w and rat.value.value >= 0.95 * w
    json.dumps(res.to_dict()), json.dumps(rat.to_dict())


def test_ascent_finds_the_steepest_point_of_a_tanh_unit():
    """f(x) = 3 tanh(w.x - 2.5), w = 1: ||J|| = 3 sqrt(n) (1 - tanh^2), largest (3 sqrt(n)) on w.x = 2.5, a
    hyperplane in the box's interior; the data sits near the origin where ||J|| is 3% of that."""
    n = 4
    model = nn.Sequential(nn.Linear(n, 1), nn.Tanh(), nn.Linear(1, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(-2.5)
        model[2].weight.fill_(3.0)
    true = 3 * math.sqrt(n)
    x = torch.rand(6, n, dtype=torch.float64) * 0.1
    data = jacobian_norm_lower(model, x)
    res = jacobian_norm_search(model, x, n_random=0, attack_points=0, steps=40)
    assert data.value < 0.1 * true
    assert res.found_by == "ascent" and res.start == "data"
    assert 0.99 * true <= res.value.value <= true
    _check_witness(res, model)


def test_relu_corner_is_found_by_random_points():
    """f(x) = relu(x1 - 0.8) + relu(x2 - 0.8): ||J|| = 0 on the data (x < 0.5), sqrt(2) only in the corner."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2, dtype=torch.float64))
        model[0].bias.fill_(-0.8)
        model[2].weight.fill_(1.0)
    res = jacobian_norm_search(model, torch.rand(4, 2, dtype=torch.float64) * 0.5, n_random=64, steps=10)
    assert res.by_source["data"] == 0.0
    assert res.value.value == pytest.approx(math.sqrt(2), rel=1e-9) and res.value.value <= math.sqrt(2)
    assert float(res.points[0].min()) > 0.8
    _check_witness(res, model)


def test_search_refuses_bad_input():
    lin = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="clip"):
        jacobian_norm_search(lin, torch.rand(2, 3), clip=(1.0, 0.0))
    with pytest.raises(ValueError, match="perturb"):
        jacobian_norm_search(lin, torch.rand(2, 3), perturb=0.0)
    with pytest.raises(ValueError, match="steps"):
        jacobian_norm_search(lin, torch.rand(2, 3), steps=-1)
    with pytest.raises(TypeError, match="floating"):
        ratio_search(lin, torch.zeros(2, 3, dtype=torch.long))


def _small_convnet(seed: int, act: str) -> nn.Module:
    torch.manual_seed(seed)
    a = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}[act]
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), a(), nn.Conv2d(3, 3, 3, stride=2),
                          a(), nn.Flatten(), nn.Linear(3 * 2 * 2, 4))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn = model[1]
        bn.running_var.copy_(torch.rand(3, generator=g) + 0.2)
        bn.weight.copy_(torch.randn(3, generator=g))
    return model.eval()


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10**6), act=st.sampled_from(["relu", "silu", "gelu"]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_property_data_le_searched_le_certified(seed, act, dtype):
    """On random small conv nets: data lower <= searched lower <= every certified upper bound; the searched
    point is a real point of the box whose dense Jacobian norm is at least the value."""
    model = _small_convnet(seed, act).to(dtype)
    x = torch.rand(6, 1, 5, 5, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    nb = network_bound(model, (1, 5, 5))
    data = jacobian_norm_lower(model, x)
    search = lower_bound_search(model, x, jacobian=FAST, ratio={"steps": 4, "n_random": 4})
    assert search.jacobian.value.value >= data.value * (1 - 1e-6)
    for meth in METHODS:
        assert nb.comparison[meth] >= search.value
    _check_witness(search.jacobian, model)
    x1, x2 = search.ratio.points  # (a value of 0: a net constant on the box returns its start, x1 == x2)
    twin, a, b = copy.deepcopy(model).double(), x1.double(), x2.double()  # the points convert exactly
    with torch.no_grad():
        ratio = torch.linalg.vector_norm(twin(a[None]) - twin(b[None])) / torch.linalg.vector_norm(a - b)
    assert search.ratio.value.value == 0.0 or search.ratio.value.value <= float(ratio) * (1 + 1e-12)
    json.dumps(search.to_dict())


def test_node_lower_bounds_match_network_bound_nodes():
    from experiments.models import create_model

    torch.manual_seed(1)
    model = create_model("wrn-tiny", in_channels=1).double().eval()
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    nb = network_bound(model, (1, 4, 4))
    lows = node_lower_bounds(model, x, steps=3, n_random=2, per_source=1, attack_points=1, attack_steps=2)
    assert set(lows) == {n["name"] for n in nb.nodes}
    for rec in nb.nodes:
        low = lows[rec["name"]]
        assert low.value.guarantee is Guarantee.LOWER and low.value.value > 0
        for meth in METHODS:
            assert rec[meth] >= low.value.value, (rec["name"], meth)
    only = node_lower_bounds(model, x, names=["stem"], steps=1, n_random=0, attack_points=0)
    assert list(only) == ["stem"]


def test_node_lower_bound_of_a_linear_node_equals_its_exact_value():
    """A node that is a single linear map: its own Jacobian is the map, so lower == exact certified value."""
    torch.manual_seed(2)
    inner = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, bias=False))
    model = nn.Sequential(nn.BatchNorm2d(2), inner, nn.ReLU(), nn.Sequential(nn.Flatten(), nn.Linear(32, 3))).double()
    with torch.no_grad():
        model[0].weight.fill_(0.01)
    model.eval()
    nb = network_bound(model, (2, 4, 4))
    lows = node_lower_bounds(model, torch.rand(3, 2, 4, 4, dtype=torch.float64), steps=2)
    for rec in nb.nodes:
        assert rec["guarantee"]["folded"] == "exact"
        assert lows[rec["name"]].value.value == pytest.approx(rec["folded"], rel=1e-6)
        assert lows[rec["name"]].value.value <= rec["folded"] * (1 + 1e-9)
    root = graph_from_module(model, (2, 4, 4))
    assert all(isinstance(n, (G.Sequential, G.Residual)) for n in G.iter_nodes(root) if n.name in lows)
