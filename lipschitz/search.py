"""Searched lower bounds of a network's l2 Lipschitz constant: ascent over the input domain.

The data lower bounds of ``lipschitz.lower`` look at the given points only; here the points move.

- ``jacobian_norm_search``: projected ascent on ``||J(x)||_2`` over the input box, started from the best
  data points, random points of the box and attack points (points on the segments of the best attack-ratio
  pairs: a pair's ratio is at most the largest ``||J||`` on its segment, so one of them is at least near it).
  The ascent direction is the gradient of the secant ``||f(x + h v) - f(x - h v)|| / (2h)`` (``v`` the
  current top right singular vector), a smoothed ``||J(x) v||`` whose gradient does not vanish where the
  Jacobian is piecewise constant (ReLU networks) and tends to that of ``||J(x) v||`` as ``h -> 0``
  (smooth activations); normalised steps with heavy-ball momentum, ``h`` and the step shrink geometrically.
  Every iterate is a real point of the box (moved off the box faces by a tiny random jitter, so almost
  surely a point of differentiability), and its ``||J||`` is evaluated there (exact Jacobian + SVD for
  small maps, else power iteration).
- ``ratio_search``: the attack-ratio ascent of ``lipschitz.lower`` (pairs in l2 balls, float64 ratios
  with a round-off allowance) around data points, random points of the box and given centres.
- ``lower_bound_search``: both (the ratio search also around the Jacobian search's best points); the
  larger value.
- ``node_lower_bounds``: ``jacobian_norm_search`` on every named node's own sub-map (blocks, stages ...)
  from the tensors that reach it on the data, keyed by the node names of ``NetworkBound.nodes``.

Every reported value is a true value of the function at a real point, re-evaluated in float64: ``||J(x*) v||``
for a unit ``v`` (less ``JACOBIAN_ROUNDOFF``) or an observed float64 ratio: guarantee LOWER.
References: Scaman & Virmaux 2018, "Lipschitz regularity of deep neural networks" (Jacobian norms as lower
bounds of the Lipschitz constant); Polyak 1964 (heavy-ball momentum).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lipschitz.ball import ascent_direction, flat_norm, per_example, random_in_ball
from lipschitz.lower import (PowerOptions, _check_batch, attack_pairs, eval_mode,
                             float64_jacobian_value, jacobian_path, jacobian_sigmas)
from spectral.guarantee import Guarantee, NormValue, json_safe

SOURCES = ("data", "random", "attack")
# secant half-width and step length, first and last step, as fractions of the domain scale (geometric in between)
ASCENT_SCHEDULE = (0.05, 0.002, 0.05, 0.002)
# heavy-ball momentum of the (normalised) ascent directions
ASCENT_MOMENTUM = 0.8


@dataclass
class LowerSearchResult:
    """A searched lower bound with the point(s) attaining it.

    ``value``: NormValue(LOWER), float64 re-evaluated. ``points``: ``(x,)`` for a Jacobian norm, ``(x1, x2)``
    for a ratio (unbatched, in the model's dtype: the exact points evaluated). ``vector``: the unit input
    direction ``v`` with ``||J(x) v|| = value`` (Jacobian). ``found_by``: "data", "random", "attack" (the
    value was found at a start point of that kind) or "ascent" (the ascent improved on its start);
    ``start``: where the winning run started. ``by_source``: the best value per kind of point.
    """

    value: NormValue
    points: tuple[torch.Tensor, ...]
    found_by: str
    start: str
    by_source: dict[str, float] = field(default_factory=dict)
    vector: torch.Tensor | None = None
    seconds: float = 0.0
    n_starts: int = 0
    steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"value": self.value.to_dict(), "found_by": self.found_by, "start": self.start,
                          "by_source": self.by_source, "seconds": self.seconds, "n_starts": self.n_starts,
                          "steps": self.steps, "points": list(self.points),
                          "vector": self.vector if self.vector is not None else None})


# ------------------------------------------------------------------------------ domain helpers

def _check_clip(clip: tuple[float, float] | None) -> None:
    if clip is not None and not (len(clip) == 2 and float(clip[0]) < float(clip[1])):
        raise ValueError(f"clip must be None or (low, high) with low < high, got {clip!r}")


def _interior(x: torch.Tensor, clip: tuple[float, float] | None, perturb: float,
              gen: torch.Generator) -> torch.Tensor:
    """``x`` jittered by ``r`` uniform in the l_inf ball of radius ``perturb * max(1, |x|_inf)``, staying in
    the box: coordinates are first pulled ``r`` inside its faces (so no coordinate sits exactly on a face)."""
    radius = per_example(perturb * flat_norm(x.detach(), math.inf).clamp_min(1.0), x.dim())
    if clip is not None:
        radius = radius.clamp_max(0.25 * (clip[1] - clip[0]))
        x = torch.maximum(torch.minimum(x, clip[1] - radius), clip[0] + radius)
    return (x + random_in_ball(x.shape, radius, "linf", generator=gen, dtype=x.dtype, device=x.device)).detach()


def _domain_scale(x: torch.Tensor, clip: tuple[float, float] | None) -> float:
    """A length for step sizes: the box diagonal, else twice the RMS distance of the points from their mean."""
    if clip is not None:
        return float(clip[1] - clip[0]) * math.sqrt(x[0].numel())
    spread = float(flat_norm(x - x.mean(0, keepdim=True), 2).pow(2).mean().sqrt())
    return 2.0 * spread if spread > 0 else 1.0


def _random_points(x: torch.Tensor, n: int, clip: tuple[float, float] | None, gen: torch.Generator) -> torch.Tensor:
    """``n`` points uniform in the box, or Gaussian with the data's per-coordinate mean and spread."""
    shape = (n, *x.shape[1:])
    if clip is not None:
        return (clip[0] + (clip[1] - clip[0]) * torch.rand(shape, generator=gen, dtype=x.dtype)).to(x.device)
    mean = x.mean(0, keepdim=True)
    std = x.std(0, keepdim=True) if x.shape[0] > 1 else torch.ones_like(x[:1])
    std = std.clamp_min(1e-3 * float(std.max().clamp_min(1e-12)))  # constant coordinates still move a little
    return mean + std * torch.randn(shape, generator=gen, dtype=x.dtype).to(x.device)


# ------------------------------------------------------------------------------ Jacobian search

@dataclass
class _Candidates:
    """Evaluated points: ||J|| (model precision), the top right singular vector, the kind of point."""

    points: torch.Tensor
    values: torch.Tensor
    vectors: torch.Tensor
    sources: list[str]

    def best_of(self, source: str, k: int) -> torch.Tensor:
        idx = torch.tensor([i for i, s in enumerate(self.sources) if s == source], dtype=torch.long)
        if idx.numel() == 0:
            return idx
        return idx[torch.argsort(self.values[idx], descending=True)[:k]]


def _segment_points(x1: torch.Tensor, x2: torch.Tensor, n: int) -> torch.Tensor:
    t = torch.linspace(0.0, 1.0, n, dtype=x1.dtype, device=x1.device)
    return (x1.unsqueeze(0) + per_example(t, x1.dim() + 1) * (x2 - x1).unsqueeze(0)).reshape(-1, *x1.shape[1:])


def _starts(model: nn.Module, x: torch.Tensor, *, clip, n_random: int, attack_points: int, attack_steps: int,
            attack_eps: float, path: str, power: PowerOptions, perturb: float,
            gen: torch.Generator) -> tuple[_Candidates, float]:
    """Data, random and attack points (jittered into the box) with their ||J||; and the best attack ratio."""
    groups = [("data", x)]
    if n_random > 0:
        groups.append(("random", _random_points(x, n_random, clip, gen)))
    pts = [_interior(p, clip, perturb, gen) for _, p in groups]
    sources = [s for s, p in groups for _ in range(p.shape[0])]
    sig = [jacobian_sigmas(model, p, path=path, power=power, gen=gen) for p in pts]
    ratio = 0.0
    if attack_points > 0 and attack_steps > 0:
        top = torch.argsort(sig[0].values, descending=True)[:attack_points]
        best, x1, x2 = attack_pairs(model, x[top], eps=attack_eps, norm="l2", steps=attack_steps,
                                    step_size=attack_eps / 4, restarts=1, min_separation=attack_eps / 10,
                                    clip=clip, gen=gen)
        ratio = float(best.max())
        seg = _interior(_segment_points(x1, x2, 9), clip, perturb, gen)
        pts.append(seg)
        sources += ["attack"] * seg.shape[0]
        sig.append(jacobian_sigmas(model, seg, path=path, power=power, gen=gen))
    return _Candidates(torch.cat(pts), torch.cat([s.values for s in sig]), torch.cat([s.vectors for s in sig]),
                       sources), ratio


def _secant_direction(model: nn.Module, x: torch.Tensor, v: torch.Tensor, h: float) -> torch.Tensor:
    """Unit (l2) gradient of ``||f(x + h v) - f(x - h v)|| / (2h)`` per sample (0 where it vanishes)."""
    xg = x.detach().requires_grad_(True)
    obj = flat_norm(model(xg + h * v) - model(xg - h * v), 2).sum() / (2 * h)
    (g,) = torch.autograd.grad(obj, xg)
    return ascent_direction(g, "l2", floor=1e-30)


def _ascend(model: nn.Module, cand: _Candidates, idx: torch.Tensor, *, steps: int, scale: float, clip,
            path: str, power: PowerOptions, perturb: float, gen: torch.Generator, progress: bool):
    """Projected secant ascent with heavy-ball momentum from ``cand.points[idx]``; per start the best
    (value, point, vector) seen."""
    x, v = cand.points[idx].clone(), cand.vectors[idx].clone()
    best_val, best_x, best_v = cand.values[idx].clone(), x.clone(), v.clone()
    h0, h1, a0, a1 = (f * scale for f in ASCENT_SCHEDULE)
    velocity = torch.zeros_like(x)
    # warm-started power iteration: one block per step (the vector keeps converging across steps)
    warm = PowerOptions(n_iter=power.check_every, tol=power.tol, batch_size=power.batch_size, jvp=power.jvp,
                        check_every=power.check_every, loop=power.loop)
    for step in tqdm(range(steps), desc="jacobian ascent", disable=not progress):
        frac = step / max(steps - 1, 1)
        h, a = h0 * (h1 / h0) ** frac, a0 * (a1 / a0) ** frac
        velocity = ASCENT_MOMENTUM * velocity + _secant_direction(model, x, v, h)
        x = x + a * velocity / per_example(flat_norm(velocity, 2).clamp_min(1e-30), x.dim())
        if clip is not None:
            x = x.clamp(*clip)
        x = _interior(x, clip, perturb, gen)
        sig = jacobian_sigmas(model, x, path=path, power=warm, v0=v, gen=gen)
        v = sig.vectors
        better = sig.values > best_val
        best_val = torch.where(better, sig.values, best_val)
        best_x[better], best_v[better] = x[better], v[better]
    return best_val, best_x, best_v


def jacobian_norm_search(model: nn.Module, x: torch.Tensor, *, clip: tuple[float, float] | None = (0.0, 1.0),
                         n_random: int = 64, attack_points: int = 16, attack_steps: int = 20,
                         attack_eps: float | None = None, per_source: int = 8, steps: int = 60,
                         method: str = "auto", power: PowerOptions | None = None, perturb: float = 1e-6,
                         seed: int = 0, progress: bool = False) -> LowerSearchResult:
    """The largest ``||J_f(x)||_2`` found over the input box by ascent from data, random and attack points.

    Candidates: the data ``x``, ``n_random`` random points (uniform in the box ``clip``; without a box,
    Gaussian with the data's per-coordinate mean and spread), and for the ``attack_points`` data points of
    largest ``||J||`` the best l2 attack-ratio pair in a ball of radius ``attack_eps`` (default 1/16 of the
    box diagonal) sampled at 9 points along its segment. The ``per_source`` best of each kind start
    ``steps`` steps of projected secant ascent (module docstring). ``method``: as in
    ``jacobian_norm_lower`` (exact Jacobians for small maps). The best point's value is re-evaluated in
    float64. Returns a LowerSearchResult (guarantee LOWER of the l2 Lipschitz constant; over R^n if no box).
    """
    _check_batch(x)
    _check_clip(clip)
    if not perturb > 0:
        raise ValueError(f"perturb must be > 0 (a point of differentiability almost surely), got {perturb}")
    if min(n_random, attack_points, attack_steps, per_source, steps) < 0:
        raise ValueError("n_random, attack_points, attack_steps, per_source and steps must be >= 0")
    t0 = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    power = power or PowerOptions(n_iter=30, tol=1e-4)
    scale = _domain_scale(x, clip)
    x = x.detach()
    with eval_mode(model):
        path = jacobian_path(model, x, method)
        cand, ratio = _starts(model, x, clip=clip, n_random=n_random, attack_points=attack_points,
                              attack_steps=attack_steps, attack_eps=attack_eps or scale / 16, path=path,
                              power=power, perturb=perturb, gen=gen)
        by_source = {s: float(cand.values[[i for i, c in enumerate(cand.sources) if c == s]].max())
                     for s in SOURCES if s in cand.sources}
        idx = torch.cat([cand.best_of(s, per_source) for s in SOURCES])
        i0 = int(torch.argmax(cand.values))
        point, vec, val, found, start = cand.points[i0], cand.vectors[i0], float(cand.values[i0]), \
            cand.sources[i0], cand.sources[i0]
        if steps > 0 and idx.numel() > 0:
            vals, pts, vecs = _ascend(model, cand, idx, steps=steps, scale=scale, clip=clip, path=path, power=power,
                                      perturb=perturb, gen=gen, progress=progress)
            by_source["ascent"] = float(vals.max())
            j = int(torch.argmax(vals))
            if float(vals[j]) > val:
                point, vec, val, found, start = pts[j], vecs[j], float(vals[j]), "ascent", cand.sources[int(idx[j])]
        value, v64 = float64_jacobian_value(model, point, vec, path=path)
    seconds = time.perf_counter() - t0
    details = {"path": path, "perturb": perturb, "clip": clip, "attack_ratio": ratio, "scale": scale,
               "n_candidates": int(cand.points.shape[0]), "value_model_precision": val}
    return LowerSearchResult(NormValue(value, Guarantee.LOWER, "jacobian_search", iterations=steps,
                                       seconds=seconds, details=details),
                             (point.detach().cpu(),), found, start, by_source, v64, seconds, int(idx.numel()), steps)


# ------------------------------------------------------------------------------ ratio search

def ratio_search(model: nn.Module, x: torch.Tensor, *, eps: float | None = None,
                 clip: tuple[float, float] | None = (0.0, 1.0), n_random: int = 32,
                 centres: torch.Tensor | None = None, centre_source: str = "jacobian", steps: int = 30,
                 restarts: int = 1, seed: int = 0) -> LowerSearchResult:
    """The largest ``||f(x1) - f(x2)||_2 / ||x1 - x2||_2`` found by the attack-ratio ascent of ``lipschitz.lower``.

    Pairs start in l2 balls of radius ``eps`` (default 1/16 of the box diagonal) around the data ``x``,
    ``n_random`` random points of the box and the given ``centres`` (labelled ``centre_source``); both points
    ascend the log-ratio inside the ball and the box; only pairs at least ``eps/10`` apart count. Ratios are
    float64 with a round-off allowance (``attack_ratio_lower``): guarantee LOWER of the l2 Lipschitz constant.
    If no pair ever had a positive ratio (a map constant there) the value is 0 and ``points`` is a centre twice.
    """
    _check_batch(x)
    _check_clip(clip)
    t0 = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    eps = _domain_scale(x, clip) / 16 if eps is None else eps
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    groups = [("data", x.detach())]
    if n_random > 0:
        groups.append(("random", _random_points(x, n_random, clip, gen)))
    if centres is not None and centres.shape[0] > 0:
        groups.append((centre_source, centres.detach().to(dtype=x.dtype, device=x.device)))
    points = torch.cat([p for _, p in groups])
    sources = [s for s, p in groups for _ in range(p.shape[0])]
    best, x1, x2 = attack_pairs(model, points, eps=eps, norm="l2", steps=steps, step_size=eps / 4,
                                restarts=restarts, min_separation=eps / 10, clip=clip, gen=gen)
    by_source = {s: float(best[[i for i, c in enumerate(sources) if c == s]].max()) for s, _ in groups}
    i = int(torch.argmax(best))
    seconds = time.perf_counter() - t0
    value = NormValue(float(best[i]), Guarantee.LOWER, "ratio_search_l2", iterations=steps * restarts,
                      seconds=seconds, details={"eps": eps, "min_separation": eps / 10, "clip": clip,
                                                "n_centres": int(points.shape[0])})
    return LowerSearchResult(value, (x1[i].cpu(), x2[i].cpu()), "ascent", sources[i], by_source, None, seconds,
                             int(points.shape[0]), steps * restarts)


@dataclass
class LowerSearch:
    """Both searches of ``lower_bound_search``; ``best`` is the one with the larger value."""

    jacobian: LowerSearchResult
    ratio: LowerSearchResult

    @property
    def best(self) -> LowerSearchResult:
        return self.jacobian if self.jacobian.value.value >= self.ratio.value.value else self.ratio

    @property
    def value(self) -> float:
        return self.best.value.value

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "guarantee": Guarantee.LOWER.value, "best": self.best.value.method,
                "jacobian": self.jacobian.to_dict(), "ratio": self.ratio.to_dict()}


def lower_bound_search(model: nn.Module, x: torch.Tensor, *, clip: tuple[float, float] | None = (0.0, 1.0),
                       seed: int = 0, jacobian: dict[str, Any] | None = None,
                       ratio: dict[str, Any] | None = None) -> LowerSearch:
    """``jacobian_norm_search`` then ``ratio_search`` (also around the Jacobian search's best point);
    ``jacobian`` / ``ratio``: keyword options of each. Guarantee LOWER."""
    jac = jacobian_norm_search(model, x, clip=clip, seed=seed, **(jacobian or {}))
    rat = ratio_search(model, x, clip=clip, seed=seed, centres=jac.points[0].unsqueeze(0), **(ratio or {}))
    return LowerSearch(jac, rat)


# ------------------------------------------------------------------------------ per-node lower bounds

def node_inputs(node, x: torch.Tensor, out: dict[int, torch.Tensor]) -> torch.Tensor:
    """``interpret(node, x)``, storing the input batch of every composite node in ``out[id(node)]``."""
    import lipschitz.graph as G
    from lipschitz.graph import interpret

    if isinstance(node, (G.Sequential, G.Residual)):
        out.setdefault(id(node), x)
    if isinstance(node, G.Sequential):
        for child in node.children:
            x = node_inputs(child, x, out)
        return x
    if isinstance(node, G.Residual):
        y = node_inputs(node.branch, x, out)
        return y + (x if node.shortcut is None else node_inputs(node.shortcut, x, out))
    return interpret(node, x)


class NodeMap(nn.Module):
    """The sub-map of one graph node as a module; ``holder`` (the network) owns the weights, so mode and dtype
    changes (``eval_mode``, a float64 copy) reach them."""

    def __init__(self, node, holder: nn.Module) -> None:
        super().__init__()
        self.node, self.holder = node, holder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lipschitz.graph import interpret

        return interpret(self.node, x)


def node_lower_bounds(model: nn.Module, x: torch.Tensor, *, names: list[str] | None = None, steps: int = 10,
                      n_random: int = 8, per_source: int = 4, attack_points: int = 4, attack_steps: int = 5,
                      method: str = "auto", seed: int = 0, progress: bool = False) -> dict[str, LowerSearchResult]:
    """Per named node (the ``NetworkBound.nodes`` names: stem, stages, blocks, ...) a LOWER bound of the
    Lipschitz constant of the node's own sub-map: ``jacobian_norm_search`` on that map (no box: a node's input
    domain is all of R^n, where its certified value holds) started from the tensors that reach the node when
    the network runs on ``x``, random points with their spread and attack points. ``names``: only these.
    A node that is a sequence of one child computes the same map as that child and shares its result."""
    import lipschitz.graph as G
    from lipschitz.trace import graph_from_module

    _check_batch(x)
    root = graph_from_module(model, tuple(x.shape[1:]))
    inputs: dict[int, torch.Tensor] = {}
    with eval_mode(model), torch.no_grad():
        node_inputs(root, x, inputs)
    nodes = [n for n in G.iter_nodes(root) if isinstance(n, (G.Sequential, G.Residual)) and n is not root
             and (n.name or getattr(n, "role", None)) and (names is None or n.name in names)]

    def same_map(node):
        while isinstance(node, G.Sequential) and len(node.children) == 1:
            node = node.children[0]
        return node

    out, done = {}, {}
    for node in tqdm(nodes, desc="node lower bounds", disable=not progress):
        key = id(same_map(node))
        if key not in done:
            done[key] = jacobian_norm_search(NodeMap(node, model), inputs[id(node)], clip=None, n_random=n_random,
                                             attack_points=attack_points, attack_steps=attack_steps,
                                             per_source=per_source, steps=steps, method=method, seed=seed)
        out[node.name] = done[key]
    return out
