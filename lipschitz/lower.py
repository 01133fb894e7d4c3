"""Data-driven lower bounds and estimates of a network's Lipschitz constant.

- ``jacobian_norm_lower``: max over samples of the per-sample Jacobian spectral norm. Small maps (a
  classifier's logits: ``min(out, in) <= EXACT_MAX_PRODUCTS``) form each Jacobian exactly
  (``vmap`` over ``jacrev``/``jacfwd``) and take its top singular value; larger ones run power iteration
  with jvp/vjp under ``torch.func.vmap`` (no Jacobian formed). The reported value is ``||J(x*) v||`` for a
  unit ``v`` at the best (randomly perturbed) point, recomputed in float64: a true lower bound of
  ``||J(x*)||`` and of the global l2 Lipschitz constant.
- ``attack_ratio_lower``: max of ``||f(x1) - f(x2)||_2 / ||x1 - x2||_p`` over pairs optimised inside an
  eps-ball (projected ascent on both points). Every observed ratio is a lower bound of the
  (l_p -> l2) Lipschitz constant.
- ``local_lipschitz_metric``: the local Lipschitz metric of Yang et al. (2020), mean over the batch
  of ``||f(x) - f(x')||_1 / ||x - x'||_inf`` with ``x'`` from signed-gradient steps in the linf ball (the
  step rule is a named variant, reported with the value), plus the stable accuracy (fraction whose
  prediction does not change). An estimate.

Searches over the whole input domain (ascent from data, random and attack points) live in
``lipschitz.search``. All functions evaluate the model in eval mode and restore every submodule's mode
afterwards.
References: Yang et al. 2020, "A Closer Look at Accuracy vs. Robustness" (NeurIPS);
Scaman & Virmaux 2018, "Lipschitz regularity of deep neural networks" (power iteration on Jacobians).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lipschitz.ball import (NORMS, ascent_direction, ascent_step, clamp_linf, flat_norm, per_example, project_delta,
                            random_in_ball)
from spectral.analyze import eval_mode  # noqa: F401  (one home; re-exported for lipschitz users)
from spectral.guarantee import Guarantee, NormValue


def _check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch shaped (N, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")


# ------------------------------------------------------------------ per-sample Jacobian norms


def _power_block(fn, jvp_mode: str, n_steps: int):
    """``n_steps`` power-iteration steps on J^T J for one sample, reusing one linearisation of fn at x.

    Returns (best ||J v|| over the steps, the unit v attaining it, the next iterate v). J v comes from
    forward mode (torch.func.jvp) or as the vjp of the linear map u -> J^T u ("double_vjp").
    """
    from torch.func import jvp, vjp

    def block(xi, vi):
        out, pullback = vjp(fn, xi)
        if jvp_mode == "double_vjp":  # u -> J^T u is linear: its vjp with cotangent v is J v
            _, pull_t = vjp(lambda u: pullback(u)[0], torch.zeros_like(out))
            apply_j = lambda v: pull_t(v)[0]  # noqa: E731
        else:
            apply_j = lambda v: jvp(fn, (xi,), (v,))[1]  # noqa: E731
        best = torch.zeros((), dtype=xi.dtype, device=xi.device)
        best_v = vi
        for _ in range(n_steps):
            jv = apply_j(vi)
            sigma = torch.linalg.vector_norm(jv)  # ||J v|| with ||v|| = 1: a certified lower bound of ||J||
            best_v = torch.where(sigma > best, vi, best_v)
            best = torch.maximum(best, sigma)
            (jtjv,) = pullback(jv)
            vi = jtjv / torch.linalg.vector_norm(jtjv).clamp_min(torch.finfo(xi.dtype).tiny)
        return best, best_v, vi

    return block


def _power(block, xb: torch.Tensor, v: torch.Tensor, n_iter: int, n_steps: int, tol: float,
           batched: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Run blocks of power-iteration steps until every sample's best value improves by <= tol (relative)."""
    from torch.func import vmap

    run = vmap(block) if batched else (
        lambda xs, vs: tuple(torch.stack(t) for t in zip(*(block(a, b) for a, b in zip(xs, vs)))))
    best = torch.zeros(xb.shape[0], dtype=xb.dtype, device=xb.device)
    best_v = v.clone()
    done = 0
    while done < n_iter:
        b, bv, v = run(xb, v)
        done += n_steps
        improved = b > best
        best_v[improved] = bv[improved]
        prev = best
        best = torch.maximum(best, b)
        if bool(((best - prev) <= tol * best.clamp_min(1e-30)).all()):
            break
    return best, best_v, done


JACOBIAN_METHODS = ("auto", "exact", "vmap", "loop")
# "auto" forms the exact Jacobian when it needs at most this many vjps (or jvps) per sample
EXACT_MAX_PRODUCTS = 64
# the exact path evaluates about this many Jacobian rows (samples x products) at a time (bounds its memory)
EXACT_CHUNK_ROWS = 1024
# relative round-off allowance of a float64 Jacobian-vector product, subtracted from a reported ||J v||
JACOBIAN_ROUNDOFF = 2.0**-36


@dataclass(frozen=True)
class PowerOptions:
    """Settings of the power iteration on J^T J (see ``jacobian_norm_lower``)."""

    n_iter: int = 100
    tol: float = 1e-6
    batch_size: int = 64
    jvp: str = "forward"
    check_every: int = 10
    loop: bool = False


@dataclass
class JacobianSigmas:
    """Per-point ``||J(x_i) v_i||`` for unit ``v_i`` (model precision) and the ``v_i`` attaining them."""

    values: torch.Tensor
    vectors: torch.Tensor
    iterations: int = 0


def _sample_fn(model: nn.Module):
    return lambda xi: model(xi.unsqueeze(0)).squeeze(0)


def jacobian_path(model: nn.Module, x: torch.Tensor, method: str = "auto",
                  exact_max: int = EXACT_MAX_PRODUCTS) -> str:
    """"exact_jacrev" (output the smaller side), "exact_jacfwd" or "power" for ``method`` on this model."""
    if method in ("vmap", "loop"):
        return "power"
    with torch.no_grad():
        m = model(x[:1]).numel()
    n = x[0].numel()
    if method == "auto" and min(m, n) > exact_max:
        return "power"
    return "exact_jacrev" if m <= n else "exact_jacfwd"


def exact_jacobians(model: nn.Module, xb: torch.Tensor, path: str = "exact_jacrev") -> torch.Tensor:
    """Per-sample Jacobians (B, out, in) by ``vmap`` of ``jacrev`` ("exact_jacrev") or ``jacfwd``."""
    from torch.func import jacfwd, jacrev, vmap

    jac = jacrev(_sample_fn(model)) if path == "exact_jacrev" else jacfwd(_sample_fn(model))
    return vmap(jac)(xb).reshape(xb.shape[0], -1, xb[0].numel())


def _top_singular(j: torch.Tensor, in_shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Top singular values (B,) and right singular vectors (B, *in_shape) of a batch of matrices."""
    _, s, vh = torch.linalg.svd(j, full_matrices=False)
    return s[:, 0], vh[:, 0, :].reshape(j.shape[0], *in_shape)


def jacobian_sigmas(model: nn.Module, points: torch.Tensor, *, path: str, power: PowerOptions = PowerOptions(),
                    v0: torch.Tensor | None = None, gen: torch.Generator | None = None,
                    progress: bool = False) -> JacobianSigmas:
    """``||J(x_i)||_2`` at each point (the caller puts the model in eval mode and picks ``path``).

    Exact paths: top singular value of the formed Jacobian. "power": best ``||J v||`` of a power iteration on
    J^T J started from ``v0`` (warm start) or random unit vectors from ``gen``.
    """
    values, vectors, iters = [], [], 0
    in_shape = tuple(points.shape[1:])
    if path != "power":
        with torch.no_grad():
            m = model(points[:1]).numel()
        chunk = max(1, EXACT_CHUNK_ROWS // min(m, points[0].numel()))
        for s in tqdm(range(0, points.shape[0], chunk), desc="exact jacobians", disable=not progress):
            with torch.no_grad():
                sig, vec = _top_singular(exact_jacobians(model, points[s:s + chunk], path), in_shape)
            values.append(sig)
            vectors.append(vec)
        return JacobianSigmas(torch.cat(values), torch.cat(vectors), 1)
    gen = gen if gen is not None else torch.Generator(device="cpu").manual_seed(0)
    steps = min(power.check_every, power.n_iter)
    block = _power_block(_sample_fn(model), power.jvp, steps)
    with torch.no_grad():
        for s in tqdm(range(0, points.shape[0], power.batch_size), desc="jacobian power iteration",
                      disable=not progress):
            xb = points[s:s + power.batch_size]
            v = v0[s:s + power.batch_size] if v0 is not None else \
                torch.randn(xb.shape, generator=gen, dtype=xb.dtype).to(xb.device)
            v = v / per_example(flat_norm(v, 2).clamp_min(1e-30), xb)
            best, best_v, it = _power(block, xb, v, power.n_iter, steps, power.tol, not power.loop)
            values.append(best)
            vectors.append(best_v)
            iters = max(iters, it)
    return JacobianSigmas(torch.cat(values), torch.cat(vectors), iters)


def float64_jacobian_value(model: nn.Module, point: torch.Tensor, vector: torch.Tensor, *,
                           path: str) -> tuple[float, torch.Tensor]:
    """``||J(point) v|| (1 - JACOBIAN_ROUNDOFF)`` in float64 for a unit ``v``, and that ``v`` (float64).

    A float64 copy of a lower-precision model evaluates it (the point converts exactly). Exact paths take
    ``v`` as the float64 Jacobian's top right singular vector; "power" refines the given ``vector`` by a
    float64 power iteration (at least its own value). A LOWER bound of ``||J(point)||``.
    """
    twin = _float64_twin(model)
    p = point.detach().to(torch.float64).unsqueeze(0)
    with eval_mode(twin):
        if path != "power":
            with torch.no_grad():
                j = exact_jacobians(twin, p, path)
            _, vec = _top_singular(j, tuple(point.shape))
            v = vec[0] / torch.linalg.vector_norm(vec[0])
            value = torch.linalg.vector_norm(j[0] @ v.reshape(-1))
        else:
            v = vector.detach().to(device=p.device, dtype=torch.float64).unsqueeze(0)
            sig = jacobian_sigmas(twin, p, path="power", power=PowerOptions(n_iter=20, tol=1e-12), v0=v)
            value, v = sig.values[0], sig.vectors[0]
    return float(value) * (1.0 - JACOBIAN_ROUNDOFF), v.detach().cpu()


def jacobian_norm_lower(model: nn.Module, x: torch.Tensor, *, method: str = "auto", n_iter: int = 100,
                        tol: float = 1e-6, batch_size: int = 64, jvp: str = "forward", check_every: int = 10,
                        perturb: float = 1e-6, exact_max: int = EXACT_MAX_PRODUCTS, seed: int = 0,
                        progress: bool = False) -> NormValue:
    """Max over the samples of ``||J_f(x_i)||_2``: exact Jacobians + SVD for small maps, else power iteration.

    ``method``: "exact" forms each per-sample Jacobian (``vmap`` of ``jacrev`` when the output is the smaller
    side, ``jacfwd`` otherwise; ``min(out, in)`` products per sample, in chunks of about ``EXACT_CHUNK_ROWS``
    rows) and takes its top singular value; "vmap" / "loop" run power iteration on J^T J (jvp + vjp, no
    Jacobian formed; samples batched with torch.func.vmap, or one at a time), ``check_every`` steps per
    linearisation, until no sample improves by more than ``tol`` (relative) or ``n_iter`` steps;
    "auto" (default) is "exact" when ``min(out, in) <= exact_max`` (a 10-logit classifier) and "vmap"
    otherwise. ``jvp``: "forward" (torch.func.jvp) or "double_vjp" (J v as the vjp of u -> J^T u).

    The Jacobians are taken at ``x_i + r_i`` with ``r_i`` uniform in the l_inf ball of radius
    ``perturb * max(1, ||x_i||_inf)`` (seeded): at a kink of an activation (e.g. ReLU at 0) autograd returns
    a one-sided derivative that need not be a derivative of f at all (relu(x) - relu(-x) - x is identically 0,
    autograd says -1 at 0); a random point is almost surely a point of differentiability where autograd is
    right. ``perturb=0`` evaluates exactly at ``x`` and labels the value ESTIMATE for that reason.

    The reported value is ``||J(x*) v||`` for a unit ``v`` at the best point ``x*``, re-evaluated in float64
    (a float64 copy for a lower-precision model; the point converts exactly) and reduced by
    ``JACOBIAN_ROUNDOFF`` (relative): a LOWER bound of ``||J(x*)||`` and so of the l2 Lipschitz constant.
    ``details``: ``per_sample`` (model precision, used to pick ``x*``), ``argmax``, ``point`` (x*),
    ``vector`` (v), ``perturb``, ``path`` ("exact_jacrev", "exact_jacfwd" or "power").
    References: Scaman & Virmaux 2018 (power iteration on the Jacobian).
    """
    _check_batch(x)
    if not perturb >= 0:
        raise ValueError(f"perturb must be >= 0, got {perturb}")
    if method not in JACOBIAN_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(JACOBIAN_METHODS)}")
    if jvp not in ("double_vjp", "forward"):
        raise ValueError(f"unknown jvp mode {jvp!r}; valid: forward, double_vjp")
    if n_iter < 1 or batch_size < 1 or check_every < 1 or exact_max < 1:
        raise ValueError(f"n_iter, batch_size, check_every and exact_max must be >= 1, got {n_iter}, {batch_size}, "
                         f"{check_every}, {exact_max}")
    t0 = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    points = _perturbed(x, perturb, gen)
    opts = PowerOptions(n_iter=n_iter, tol=tol, batch_size=batch_size, jvp=jvp, check_every=check_every,
                        loop=method == "loop")
    with eval_mode(model):
        path = jacobian_path(model, x, method, exact_max)
        sig = jacobian_sigmas(model, points, path=path, power=opts, gen=gen, progress=progress)
        idx = int(torch.argmax(sig.values))
        value, vector = float64_jacobian_value(model, points[idx], sig.vectors[idx], path=path)
    details = {"per_sample": sig.values.tolist(), "argmax": idx, "point": points[idx].detach().cpu(),
               "vector": vector, "n_samples": int(x.shape[0]), "perturb": perturb, "path": path,
               "jacobian_roundoff": JACOBIAN_ROUNDOFF}
    if perturb == 0:
        details["note"] = "evaluated exactly at x: at a kink autograd's one-sided derivative is not a Jacobian"
    name = f"jacobian_{path}" if path != "power" else f"jacobian_power_{'loop' if opts.loop else 'vmap'}_{jvp}"
    return NormValue(value, Guarantee.LOWER if perturb > 0 else Guarantee.ESTIMATE, name,
                     iterations=sig.iterations, seconds=time.perf_counter() - t0, details=details)


def _perturbed(x: torch.Tensor, perturb: float, gen: torch.Generator) -> torch.Tensor:
    """x_i + r_i, r_i uniform in the l_inf ball of radius perturb * max(1, ||x_i||_inf) (x itself if perturb = 0)."""
    if perturb == 0:
        return x
    radius = per_example(perturb * flat_norm(x.detach(), math.inf).clamp_min(1.0), x)
    return x + random_in_ball(x.shape, radius, "linf", generator=gen, dtype=x.dtype, device=x.device)


# ------------------------------------------------------------------------ attack-based ratio


def attack_ratio_lower(model: nn.Module, x: torch.Tensor, *, eps: float, norm: str = "l2", steps: int = 50,
                       step_size: float | None = None, restarts: int = 1, min_separation: float | None = None,
                       clip: tuple[float, float] | None = (0.0, 1.0), seed: int = 0) -> NormValue:
    """Max over samples of ``||f(x1) - f(x2)||_2 / ||x1 - x2||_p`` with x1, x2 in the eps-ball around x_i.

    Both points are optimised by projected ascent on log of the ratio (sign steps for linf, normalised
    gradient steps for l2) in the model's dtype. Ratios are recorded in float64 (a float64 model at every
    step; for a lower-precision model, each sample's best pair is re-evaluated at the end by a float64 copy,
    the points converted exactly), with the numerator reduced by a round-off allowance of
    ``DIFFERENCE_ROUNDOFF * (||f(x1)|| + ||f(x2)||)``, so cancellation in f(x1) - f(x2) cannot inflate a
    ratio (in float32 it did, by 8% on a layer with a large bias); only pairs at least ``min_separation``
    apart (default eps/10) count. Each recorded ratio is an observed ratio, so the max is a LOWER bound of
    the (l_p -> l2) Lipschitz constant (the l2 constant for norm="l2").
    """
    _check_batch(x)
    _check_norm(norm)
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    step_size = eps / 4 if step_size is None else step_size
    min_sep = eps / 10 if min_separation is None else min_separation
    t0 = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    best, x1, x2 = attack_pairs(model, x, eps=eps, norm=norm, steps=steps, step_size=step_size, restarts=restarts,
                                min_separation=min_sep, clip=clip, gen=gen)
    idx = int(torch.argmax(best))
    return NormValue(float(best[idx]), Guarantee.LOWER, f"attack_ratio_{norm}", iterations=steps * restarts,
                     seconds=time.perf_counter() - t0,
                     details={"input_norm": norm, "output_norm": "l2", "eps": eps, "argmax": idx,
                              "per_sample": best.tolist(), "min_separation": min_sep,
                              "pair": (x1[idx].cpu(), x2[idx].cpu()), "difference_roundoff": DIFFERENCE_ROUNDOFF})


def attack_pairs(model: nn.Module, x: torch.Tensor, *, eps: float, norm: str, steps: int, step_size: float,
                 restarts: int, min_separation: float, clip: tuple[float, float] | None,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ascent of ``attack_ratio_lower``: per sample, the best float64 ratio (round-off allowance
    subtracted, 0 if no pair was ``min_separation`` apart) and the pair (x1, x2) attaining it."""
    p = 2.0 if norm == "l2" else math.inf
    twin = _float64_twin(model)
    pairs = _PairTracker(x, twin, twin is model, p, min_separation)

    def clipped(t: torch.Tensor) -> torch.Tensor:
        return t if clip is None else t.clamp(*clip)

    with eval_mode(model), eval_mode(twin):
        for _ in range(restarts):
            d1 = random_in_ball(x.shape, eps, norm, generator=gen, dtype=x.dtype, device=x.device) / 2
            d2 = random_in_ball(x.shape, eps, norm, generator=gen, dtype=x.dtype, device=x.device)
            for _step in range(steps + 1):
                x1 = clipped(x + d1).detach().requires_grad_(True)
                x2 = clipped(x + d2).detach().requires_grad_(True)
                out1, out2 = model(x1), model(x2)
                num = flat_norm(out1 - out2, 2)
                den = flat_norm(x1 - x2, p)
                pairs.update(x1, x2, out1, out2, num, den)
                if _step == steps:
                    break
                obj = (torch.log(num.clamp_min(1e-30)) - torch.log(den.clamp_min(1e-30))).sum()
                g1, g2 = torch.autograd.grad(obj, (x1, x2))
                d1 = project_delta(clipped(x1.detach() + step_size * ascent_direction(g1, norm, 1e-30)) - x, eps, norm)
                d2 = project_delta(clipped(x2.detach() + step_size * ascent_direction(g2, norm, 1e-30)) - x, eps, norm)
                d1, d2 = d1.detach(), d2.detach()
        best = pairs.result()
    return best, pairs.x1, pairs.x2


# relative round-off allowance of a float64 forward, subtracted from ||f(x1) - f(x2)|| (times the output norms)
DIFFERENCE_ROUNDOFF = 2.0**-36


def _float64_twin(model: nn.Module) -> nn.Module:
    """The model itself if every floating parameter and buffer is float64, else a float64 copy of it."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    if all(t.dtype == torch.float64 for t in tensors):
        return model
    return copy.deepcopy(model).to(torch.float64)


class _PairTracker:
    """Per-sample best ratio in float64 and its pair (x1, x2): directly for a float64 model, else from the best
    pair (by the model's own ratio) re-evaluated by the float64 twin in ``result()``."""

    def __init__(self, x: torch.Tensor, twin: nn.Module, twin_is_model: bool, p: float, min_sep: float) -> None:
        self.twin, self.twin_is_model, self.p, self.min_sep = twin, twin_is_model, p, min_sep
        self.best = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        self.cand = torch.full((x.shape[0],), -1.0, dtype=x.dtype, device=x.device)
        self.x1, self.x2 = x.detach().clone(), x.detach().clone()
        self.seen = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    def update(self, x1, x2, out1, out2, num, den) -> None:
        if self.twin_is_model and out1.dtype == torch.float64:
            outs = (out1.detach(), out2.detach())
            ratio = _recorded_ratio(self.twin, x1, x2, self.p, self.min_sep, outs)
            better = ratio > self.best
            self.best = torch.where(better, ratio, self.best)
            self.x1[better], self.x2[better] = x1.detach()[better], x2.detach()[better]
            return
        ratio = torch.where(den >= self.min_sep, num / den.clamp_min(1e-30), torch.full_like(num, -1.0)).detach()
        better = ratio > self.cand
        self.cand = torch.where(better, ratio, self.cand)
        self.x1[better], self.x2[better] = x1.detach()[better], x2.detach()[better]
        self.seen |= better

    def result(self) -> torch.Tensor:
        if self.seen.any():
            ratio = _recorded_ratio(self.twin, self.x1, self.x2, self.p, self.min_sep, None)
            self.best = torch.maximum(self.best, torch.where(self.seen, ratio, torch.zeros_like(ratio)))
        return self.best


def _recorded_ratio(twin: nn.Module, x1: torch.Tensor, x2: torch.Tensor, p: float, min_sep: float,
                    outs: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Per-sample float64 ratio (||f(x1) - f(x2)|| - round-off allowance) / ||x1 - x2||_p, 0 where the pair
    is closer than ``min_sep``; ``outs``: the float64 outputs when they are already computed."""
    a, b = x1.detach().to(torch.float64), x2.detach().to(torch.float64)
    with torch.no_grad():
        fa, fb = outs if outs is not None else (twin(a), twin(b))
    allowance = DIFFERENCE_ROUNDOFF * (flat_norm(fa, 2) + flat_norm(fb, 2))
    num = (flat_norm(fa - fb, 2) - allowance).clamp_min(0.0)
    den = flat_norm(a - b, p)
    return torch.where(den >= min_sep, num / den.clamp_min(1e-300), torch.zeros_like(num))


# ------------------------------------------------------------------- Yang et al. local metric


@dataclass
class LocalLipschitzResult:
    """Local Lipschitz metric (mean ratio, ESTIMATE) with the stable accuracy beside it."""

    value: NormValue
    stable_accuracy: float
    per_sample: list[float] = field(default_factory=list)
    accuracy_clean: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value.to_dict(), "stable_accuracy": self.stable_accuracy,
                "accuracy_clean": self.accuracy_clean, "per_sample": self.per_sample}


LOCAL_LIPSCHITZ_VARIANTS = ("eps/4", "step-0.003", "yang2020-code")


def local_lipschitz_metric(model: nn.Module, x: torch.Tensor, eps: float, *, y: torch.Tensor | None = None,
                           steps: int = 10, step_size: float | None = None, top_norm: float = 1.0,
                           bottom_norm: float = math.inf, init_std: float = 1e-3, batch_size: int = 256,
                           seed: int = 0, progress: bool = False, variant: str = "eps/4") -> LocalLipschitzResult:
    """Yang et al. (2020) local Lipschitz metric on logits: mean over x of ||f(x)-f(x')||_1 / ||x-x'||_inf.

    ``x'`` starts at ``x + init_std * N(0, I)`` and takes ``steps`` signed-gradient steps, projected to the linf
    eps-ball and [0, 1]. ``variant`` says which step rule (recorded in the result's details):
    "eps/4" ascends the ratio with steps of eps/4 (archlip's default); "step-0.003" ascends with the fixed 0.003
    steps of the published code; "yang2020-code" reproduces that code literally: 0.003 steps along the sign of
    the gradient of the *negated* ratio (which moves x' down the ratio) and ``||x - x' + 1e-6||`` below.
    ``step_size`` overrides the variant's step. ``stable_accuracy``: fraction of samples whose predicted class at
    x' equals that at x. ``accuracy_clean`` when labels ``y`` are given.
    References: Yang et al. 2020, "A Closer Look at Accuracy vs. Robustness".
    """
    _check_batch(x)
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if y is not None and y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} labels for {x.shape[0]} inputs")
    if variant not in LOCAL_LIPSCHITZ_VARIANTS:
        raise ValueError(f"unknown local Lipschitz variant {variant!r}; choose one of: {', '.join(LOCAL_LIPSCHITZ_VARIANTS)}")
    literal = variant == "yang2020-code"
    if step_size is None:
        step_size = eps / 4 if variant == "eps/4" else 0.003
    direction = -1.0 if literal else 1.0  # the published loop adds step * sign(grad(-ratio))
    offset = 1e-6 if literal else 0.0
    t0 = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ratios, stable, correct = [], [], []
    with eval_mode(model):
        for s in tqdm(range(0, x.shape[0], batch_size), desc="local lipschitz", disable=not progress):
            xb = x[s:s + batch_size]
            with torch.no_grad():
                fx = model(xb)
            noise = torch.randn(xb.shape, generator=gen, dtype=xb.dtype).to(xb.device)
            xp = (xb + init_std * noise).detach()
            for _ in range(steps):
                xp.requires_grad_(True)
                ratio = flat_norm(model(xp) - fx, top_norm) / flat_norm(xb - xp + offset, bottom_norm).clamp_min(1e-30)
                (grad,) = torch.autograd.grad(ratio.sum(), xp)
                xp = clamp_linf(ascent_step(xp.detach(), grad, direction * step_size, "linf"), xb, eps).detach()
            with torch.no_grad():
                fxp = model(xp)
                r = flat_norm(fxp - fx, top_norm) / flat_norm(xb - xp + offset, bottom_norm).clamp_min(1e-30)
            ratios.append(r)
            stable.append(fxp.argmax(1) == fx.argmax(1))
            if y is not None:
                correct.append(fx.argmax(1) == y[s:s + batch_size].to(fx.device))
    r = torch.cat(ratios)
    return LocalLipschitzResult(
        value=NormValue(float(r.mean()), Guarantee.ESTIMATE, "local_lipschitz_yang2020", iterations=steps,
                        seconds=time.perf_counter() - t0,
                        details={"eps": eps, "top_norm": top_norm, "bottom_norm": bottom_norm,
                                 "step_size": step_size, "variant": variant,
                                 "direction": "descent (as the published code)" if literal else "ascent"}),
        stable_accuracy=float(torch.cat(stable).float().mean()),
        per_sample=r.tolist(),
        accuracy_clean=float(torch.cat(correct).float().mean()) if correct else None,
    )
