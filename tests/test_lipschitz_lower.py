"""Data lower bounds: Jacobian power iteration against dense Jacobians, attack ratios, Yang et al. metric."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import jacrev

from lipschitz.lower import attack_ratio_lower, eval_mode, jacobian_norm_lower, local_lipschitz_metric
from spectral.guarantee import Guarantee


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 5)).double()


def _dense_jacobian_norms(model, x):
    out = []
    with eval_mode(model):
        for xi in x:
            j = jacrev(lambda t: model(t[None])[0])(xi).reshape(5, -1)
            out.append(float(torch.linalg.matrix_norm(j.detach(), ord=2)))
    return out


@pytest.mark.parametrize("method,jvp", [("vmap", "double_vjp"), ("loop", "double_vjp"), ("vmap", "forward")])
def test_jacobian_power_matches_dense(method, jvp):
    model = _small_net()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    n = 4 if (method, jvp) == ("vmap", "double_vjp") else 2
    x = torch.rand(n, 1, 4, 4, dtype=torch.float64)
    res = jacobian_norm_lower(model, x, n_iter=100, tol=1e-10, batch_size=4, method=method, jvp=jvp)
    dense = _dense_jacobian_norms(model, x)
    assert res.guarantee is Guarantee.LOWER
    for got, ref in zip(res.details["per_sample"], dense):
        assert got <= ref * (1 + 1e-10)
        assert got == pytest.approx(ref, rel=1e-6)
    assert res.value == pytest.approx(max(dense), rel=1e-6)
    assert res.details["argmax"] == max(range(n), key=dense.__getitem__)


def test_jacobian_restores_modes_and_needs_float():
    model = _small_net()
    model.train()
    model[1].eval()
    jacobian_norm_lower(model, torch.rand(2, 1, 4, 4, dtype=torch.float64), n_iter=3)
    assert model.training and not model[1].training and model[0].training
    with pytest.raises(TypeError, match="floating"):
        jacobian_norm_lower(model, torch.zeros(2, 1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="method"):
        jacobian_norm_lower(model, torch.rand(2, 1, 4, 4, dtype=torch.float64), method="dense")


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_attack_ratio_linear_model(norm):
    torch.manual_seed(1)
    lin = nn.Linear(8, 3, bias=True).double()
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.rand(5, 1, 8, dtype=torch.float64) * 0.5 + 0.25
    res = attack_ratio_lower(model, x, eps=0.2, norm=norm, steps=60, clip=None)
    w = lin.weight.detach()
    # l2 -> l2 constant is ||W||_2; linf -> l2 constant is max over sign vectors ||W s||_2 (attained at a vertex).
    if norm == "l2":
        exact = float(torch.linalg.matrix_norm(w, ord=2))
    else:
        signs = torch.tensor([[1 - 2 * ((k >> b) & 1) for b in range(8)] for k in range(256)], dtype=torch.float64)
        exact = float(torch.linalg.vector_norm(signs @ w.T, dim=1).max())
    assert res.guarantee is Guarantee.LOWER
    assert res.value <= exact * (1 + 1e-9)
    assert res.value >= 0.95 * exact


def test_attack_ratio_below_jacobian_upper_for_relu_net():
    model = _small_net()
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    res = attack_ratio_lower(model, x, eps=0.1, steps=10)
    # product of layer norms is an upper bound of the l2 constant
    with eval_mode(model):
        bn = model[1]
        d = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs().max()
        conv = model[0].weight.detach().reshape(3, -1)
        up = float(torch.linalg.matrix_norm(conv, ord=2)) * 9 ** 0.5 * float(d) * float(
            torch.linalg.matrix_norm(model[4].weight.detach(), ord=2))
    assert 0 < res.value <= up


def test_local_lipschitz_metric_linear_closed_form():
    torch.manual_seed(2)
    lin = nn.Linear(6, 4, bias=False).double()
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.rand(7, 6, dtype=torch.float64) * 0.5 + 0.25
    res = local_lipschitz_metric(model, x, eps=0.05, steps=10, y=torch.zeros(7, dtype=torch.long))
    # ||W d||_1 / ||d||_inf <= ||W||_{inf->1} = max over sign vectors of ||W s||_1
    signs = torch.tensor([[1 - 2 * ((k >> b) & 1) for b in range(6)] for k in range(64)], dtype=torch.float64)
    bound = float((signs @ lin.weight.detach().T).abs().sum(1).max())
    assert res.value.guarantee is Guarantee.ESTIMATE
    assert 0 < res.value.value <= bound * (1 + 1e-9)
    assert max(res.per_sample) >= 0.5 * bound
    assert 0.0 <= res.stable_accuracy <= 1.0 and res.accuracy_clean is not None
    assert math.isfinite(res.to_dict()["value"]["value"])


def test_local_lipschitz_stable_accuracy_constant_model():
    class Const(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 3, dtype=x.dtype) + torch.tensor([0.0, 1.0, 0.0], dtype=x.dtype) \
                + 0.0 * x.flatten(1).sum(1, keepdim=True)

    res = local_lipschitz_metric(Const(), torch.rand(4, 2, dtype=torch.float64), eps=0.1, steps=2)
    assert res.stable_accuracy == 1.0 and res.value.value == 0.0


@pytest.mark.parametrize("eps", [0.1, 0.01, 0.001])
def test_attack_ratio_is_not_inflated_by_float32_cancellation(eps):
    """Linear(16, 4), weights 0.01 randn, bias 1000 (float32): f(x1) - f(x2) cancelled in float32 and the
    'lower' ratio exceeded the true constant (0.06707 > 0.06215 at eps 0.01)."""
    for seed in range(3):
        torch.manual_seed(seed)
        lin = nn.Linear(16, 4)
        with torch.no_grad():
            lin.weight.copy_(0.01 * torch.randn(4, 16))
            lin.bias.fill_(1000.0)
        true = float(torch.linalg.matrix_norm(lin.weight.detach().double(), ord=2))
        r = attack_ratio_lower(lin, torch.rand(8, 16), eps=eps, clip=None, seed=seed)
        assert r.guarantee is Guarantee.LOWER
        assert r.value <= true
        assert r.value >= 0.9 * true  # the ascent still finds (almost) the top direction
    assert next(lin.parameters()).dtype == torch.float32  # the model itself is left in float32


def test_jacobian_lower_at_a_kink_is_a_jacobian_of_the_function():
    """relu(x) - relu(-x) - x is identically 0; at x = 0 autograd's one-sided derivatives give -1."""

    class Zero(nn.Module):
        def forward(self, x):
            return torch.relu(x) - torch.relu(-x) - x

    for dtype in (torch.float32, torch.float64):
        res = jacobian_norm_lower(Zero(), torch.zeros(3, 4, dtype=dtype), n_iter=5)
        assert res.value == 0.0 and res.guarantee is Guarantee.LOWER
    exact_point = jacobian_norm_lower(Zero(), torch.zeros(1, 4), n_iter=5, perturb=0.0)
    assert exact_point.guarantee is Guarantee.ESTIMATE and "kink" in exact_point.details["note"]
    with pytest.raises(ValueError, match="perturb"):
        jacobian_norm_lower(Zero(), torch.zeros(1, 4), perturb=-1.0)


# ------------------------------------------------------------------ exact per-sample Jacobians (small maps)

def _dense_norm_at(model, point: torch.Tensor) -> float:
    """||J(point)||_2 of a float64 copy of the model, by jacrev and a dense SVD (the reference)."""
    twin = model if next(model.parameters()).dtype == torch.float64 else __import__("copy").deepcopy(model).double()
    with eval_mode(twin):
        p = point.detach().double()
        j = jacrev(lambda t: twin(t[None])[0])(p).detach()
    return float(torch.linalg.matrix_norm(j.reshape(-1, p.numel()), ord=2))


@pytest.mark.parametrize("method", ["auto", "exact"])
def test_exact_jacobian_matches_jacrev_per_sample(method):
    model = _small_net()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    res = jacobian_norm_lower(model, x, method=method)
    assert res.details["path"] == "exact_jacrev" and res.method == "jacobian_exact_jacrev"
    # per-sample values are the dense norms at the perturbed points (perturbation 1e-6: same linear region)
    dense = _dense_jacobian_norms(model, x)
    for got, ref in zip(res.details["per_sample"], dense):
        assert got == pytest.approx(ref, rel=1e-9)
    # the headline is ||J v|| at the reported point, below the dense norm there by at most the allowance
    at_point = _dense_norm_at(model, res.details["point"])
    assert res.value <= at_point and res.value == pytest.approx(at_point, rel=1e-10)
    assert res.guarantee is Guarantee.LOWER


def test_exact_jacobian_forward_mode_when_output_is_larger():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 20), nn.Tanh(), nn.Linear(20, 30)).double()
    x = torch.rand(5, 3, dtype=torch.float64)
    res = jacobian_norm_lower(model, x, method="exact")
    assert res.details["path"] == "exact_jacfwd"
    assert res.value == pytest.approx(max(_dense_norm_at(model, p) for p in x), rel=1e-6)


def test_auto_uses_power_iteration_for_large_maps():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(80, 80), nn.ReLU(), nn.Linear(80, 70)).double()
    x = torch.rand(3, 80, dtype=torch.float64)
    res = jacobian_norm_lower(model, x, n_iter=200, tol=1e-12)
    assert res.details["path"] == "power" and res.method.startswith("jacobian_power")
    exact = jacobian_norm_lower(model, x, method="exact")
    assert res.value == pytest.approx(exact.value, rel=1e-6)
    assert jacobian_norm_lower(model, x, exact_max=80).details["path"] == "exact_jacrev"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_jacobian_of_linear_model_is_the_weight_norm(dtype):
    """For f(x) = W x + b the Jacobian is W everywhere: the value is ||W||_2 (float64 of the stored W)."""
    torch.manual_seed(5)
    lin = nn.Linear(12, 7).to(dtype)
    with torch.no_grad():
        lin.weight.mul_(100.0)
        lin.bias.fill_(1000.0)
    w_norm = float(torch.linalg.matrix_norm(lin.weight.detach().double(), ord=2))
    res = jacobian_norm_lower(lin, torch.rand(4, 12, dtype=dtype))
    assert res.details["path"] == "exact_jacrev"
    assert res.value <= w_norm and res.value == pytest.approx(w_norm, rel=1e-9)
    assert next(lin.parameters()).dtype == dtype  # a float32 model stays float32 (a float64 copy evaluates)


def test_float32_model_value_is_recomputed_in_float64():
    model = _small_net().float()
    x = torch.rand(5, 1, 4, 4)
    for method in ("exact", "vmap"):
        res = jacobian_norm_lower(model, x, method=method, n_iter=100, tol=1e-9)
        at_point = _dense_norm_at(model, res.details["point"])
        assert res.value <= at_point and res.value == pytest.approx(at_point, rel=1e-6)
        assert res.details["vector"].dtype == torch.float64
        assert res.details["point"].dtype == torch.float32


def test_attack_ratio_reports_its_pair():
    model = _small_net()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    res = attack_ratio_lower(model, x, eps=0.2, steps=5)
    x1, x2 = res.details["pair"]
    with eval_mode(model), torch.no_grad():
        ratio = float(torch.linalg.vector_norm(model(x1[None]) - model(x2[None])) / torch.linalg.vector_norm(x1 - x2))
    assert res.value <= ratio and res.value == pytest.approx(ratio, rel=1e-9)
