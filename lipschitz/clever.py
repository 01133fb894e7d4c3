"""CLEVER: extreme-value estimate of the local Lipschitz constant and robustness score.

For a classifier f, predicted class c and target j, g(x) = f_c(x) - f_j(x). Gradient dual norms
||grad g(x)||_q are sampled uniformly in the l_p ball of radius R around x0 (q the dual of p), the
maximum of each batch is kept, and a reverse Weibull distribution is fitted to the batch maxima; its
location (right end point) estimates the local Lipschitz constant L_q^j. The score is
min(g(x0) / L_q^j, R); untargeted = min over j != c. The fit follows the original robust procedure:
rescaled samples, several initial shape parameters, a shape-regularised MLE, a Kolmogorov-Smirnov
goodness-of-fit test, and a fallback to the sample maximum when no fit passes.
Everything here is an ESTIMATE (no guarantee in either direction).

References: Weng et al. 2018, "Evaluating the Robustness of Neural Networks: An Extreme Value Theory
Approach" (ICLR).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lipschitz.ball import random_in_ball
from lipschitz.lower import eval_mode
from spectral.guarantee import Guarantee, NormValue

DUAL = {"l2": 2.0, "linf": 1.0, "l1": math.inf}
C_INIT = (0.1, 1.0, 5.0, 10.0, 20.0, 50.0, 100.0)


@dataclass
class WeibullFit:
    """Result of the reverse-Weibull fit: ``lipschitz`` is the fitted right end point (or the max)."""

    lipschitz: float
    shape: float | None
    loc: float | None
    scale: float | None
    ks_statistic: float | None
    p_value: float | None
    fallback: str | None
    sample_max: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def fit_reverse_weibull(maxima, *, shape_reg: float = 0.01, c_init=C_INIT, min_p_value: float = 1e-3) -> WeibullFit:
    """Fit a reverse Weibull to batch maxima; the location is the estimate of their supremum.

    -maxima follows a (min-)Weibull: fit scipy's weibull_min to rescaled -maxima from each initial
    shape in ``c_init`` with the negative log-likelihood plus ``shape_reg * shape**2``, keep the fit with
    the best KS p-value; if none reaches ``min_p_value`` (or the maxima are all equal) return the sample max.
    """
    from scipy import optimize, stats

    sample = np.asarray(maxima, dtype=np.float64).ravel()
    if sample.size < 2 or not np.all(np.isfinite(sample)):
        raise ValueError(f"need at least 2 finite batch maxima, got {sample.size} (finite: {np.isfinite(sample).all()})")
    smax, smin = float(sample.max()), float(sample.min())
    spread = smax - smin
    if spread <= 1e-12 * max(1.0, abs(smax)):
        return WeibullFit(smax, None, None, None, None, None, "degenerate_sample", smax)
    rescaled = (sample - smax) / spread

    def regularised_fmin(func, x0, args=(), disp=0):
        return optimize.fmin(lambda th: func(th, *args) + shape_reg * th[0] ** 2, x0, disp=0,
                             xtol=1e-4, ftol=1e-4)

    best = None
    for c0 in c_init:
        try:
            c, loc, scale = stats.weibull_min.fit(-rescaled, c0, optimizer=regularised_fmin)
        except (ValueError, RuntimeError, FloatingPointError):
            continue
        loc, scale = -smax + loc * spread, scale * spread
        ks, p = stats.kstest(-sample, "weibull_min", args=(c, loc, scale))
        if np.isfinite(p) and (best is None or p > best[4]):
            best = (float(c), float(loc), float(scale), float(ks), float(p))
    if best is None or best[4] < min_p_value:
        p = None if best is None else best[4]
        return WeibullFit(smax, None, None, None, None, p, "ill_conditioned_fit", smax)
    c, loc, scale, ks, p = best
    return WeibullFit(-loc, c, loc, scale, ks, p, None, smax)


def _sample_ball(n: int, shape, radius: float, norm: str, gen: torch.Generator, dtype) -> torch.Tensor:
    if norm in ("linf", "l2"):
        return random_in_ball((n,) + tuple(shape), radius, norm, generator=gen, dtype=dtype)
    d = math.prod(shape)
    # l1 ball: uniform via exponential spacings with random signs.
    e = -torch.log(torch.rand((n, d + 1), generator=gen, dtype=dtype))
    pts = e[:, :d] / e.sum(1, keepdim=True)
    signs = torch.randint(0, 2, (n, d), generator=gen).to(dtype) * 2 - 1
    return (radius * pts * signs).reshape((n,) + tuple(shape))


@dataclass
class CleverResult:
    """CLEVER score (min over targets) with the per-target Lipschitz estimates and fits."""

    score: NormValue
    lipschitz: NormValue
    predicted_class: int
    target: int
    per_target: dict[int, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score.to_dict(), "lipschitz": self.lipschitz.to_dict(),
                "predicted_class": self.predicted_class, "target": self.target,
                "per_target": {str(k): v for k, v in self.per_target.items()}}


def clever(model: nn.Module, x0: torch.Tensor, *, norm: str = "l2", radius: float = 2.0,
           target: int | str = "untargeted", n_batches: int = 50, batch_size: int = 128,
           clip: tuple[float, float] | None = (0.0, 1.0), shape_reg: float = 0.01, seed: int = 0) -> CleverResult:
    """CLEVER robustness score of one input ``x0`` (shape (C, H, W) or (F,), no batch dimension).

    ``norm``: the perturbation norm p ("l2", "linf" or "l1"); gradients are measured in the dual norm q.
    ``target``: a class index (targeted) or "untargeted" (min over every class j != predicted).
    Returns a CleverResult whose ``score`` and ``lipschitz`` are NormValue(ESTIMATE).
    References: Weng et al. 2018 (CLEVER).
    """
    if norm not in DUAL:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(DUAL)}")
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise TypeError("x0 must be a floating-point tensor without batch dimension, e.g. shape (C, H, W)")
    if radius <= 0 or n_batches < 2 or batch_size < 1:
        raise ValueError(f"need radius > 0, n_batches >= 2, batch_size >= 1; got {radius}, {n_batches}, {batch_size}")
    t0 = time.perf_counter()
    q = DUAL[norm]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with eval_mode(model):
        with torch.no_grad():
            logits0 = model(x0.unsqueeze(0))[0]
        n_classes = logits0.shape[0]
        c = int(logits0.argmax())
        if target == "untargeted":
            targets = [j for j in range(n_classes) if j != c]
        elif isinstance(target, int) and 0 <= target < n_classes and target != c:
            targets = [target]
        else:
            raise ValueError(f"target must be 'untargeted' or a class index in [0, {n_classes}) other than "
                             f"the predicted class {c}; got {target!r}")
        maxima = {j: [] for j in targets}
        for _ in range(n_batches):
            delta = _sample_ball(batch_size, x0.shape, radius, norm, gen, x0.dtype).to(x0.device)
            xs = x0.unsqueeze(0) + delta
            if clip is not None:
                xs = xs.clamp(*clip)
            xs = xs.detach().requires_grad_(True)
            out = model(xs)
            for k, j in enumerate(targets):
                (grad,) = torch.autograd.grad((out[:, c] - out[:, j]).sum(), xs, retain_graph=k < len(targets) - 1)
                maxima[j].append(float(torch.linalg.vector_norm(grad.flatten(1), ord=q, dim=1).max()))
    per_target = {}
    for j in targets:
        fit = fit_reverse_weibull(maxima[j], shape_reg=shape_reg)
        g0 = float(logits0[c] - logits0[j])
        per_target[j] = {"lipschitz": fit.lipschitz, "margin": g0,
                         "score": min(g0 / fit.lipschitz, radius) if fit.lipschitz > 0 else radius,
                         "fit": fit.to_dict()}
    j_star = min(per_target, key=lambda j: per_target[j]["score"])
    seconds = time.perf_counter() - t0
    details = {"norm": norm, "dual_norm": q, "radius": radius, "n_batches": n_batches, "batch_size": batch_size}
    return CleverResult(
        score=NormValue(per_target[j_star]["score"], Guarantee.ESTIMATE, "clever_score", seconds=seconds,
                        details=details),
        lipschitz=NormValue(per_target[j_star]["lipschitz"], Guarantee.ESTIMATE, "clever_reverse_weibull",
                            seconds=seconds, details=dict(details, fit=per_target[j_star]["fit"])),
        predicted_class=c, target=j_star, per_target=per_target)
