"""The eps-ball of a batch, in one place: per-example norms, random starts, projections and ascent steps.

Used by the attacks (``experiments.attacks``), the training adversary (``experiments.training.adversary``),
the attack-based lower bounds and the local Lipschitz metric (``lipschitz.lower``, ``lipschitz.search``).
``norm`` is "linf" or "l2"; each example (dim 0) has its own ball around its own centre.

References: Madry et al. 2018 (projected gradient ascent, uniform start in the ball).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["NORMS", "flat_norm", "per_example", "random_in_ball", "project_delta", "project", "clamp_linf", "linf_box",
           "ascent_direction", "ascent_step"]

NORMS = ("linf", "l2")
# smallest norm a direction or a delta is divided by (a zero gradient gives a zero step)
NORM_FLOOR = 1e-12


def flat_norm(t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """The ``p``-norm of each example (dim 0) over all its other dims: shape ``(N,)``."""
    return torch.linalg.vector_norm(t.flatten(1), ord=p, dim=1)


def per_example(v: torch.Tensor, like: torch.Tensor | int) -> torch.Tensor:
    """``v`` of shape ``(N,)`` viewed as ``(N, 1, ..., 1)`` to broadcast against ``like`` (a tensor or its ndim)."""
    ndim = like if isinstance(like, int) else like.dim()
    return v.view(-1, *([1] * (ndim - 1)))


def random_in_ball(shape: Sequence[int], eps: float, norm: str, *, generator: torch.Generator | None,
                   dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """A perturbation drawn uniformly from each example's ``norm`` eps-ball: ``eps * U(-1, 1)`` per coordinate
    (linf; ``eps`` may be a per-example tensor ``(N, 1, ..., 1)`` on ``device``), or a Gaussian direction at
    radius ``eps * U^(1/d)`` (l2). Drawn on the generator's device (or ``device`` without a generator),
    returned on ``device``."""
    shape = tuple(shape)
    draw_on = generator.device if generator is not None else device
    if norm == "linf":
        u = torch.rand(shape, generator=generator, dtype=dtype, device=draw_on)
        return (_to(u, device) * 2 - 1) * eps
    d = torch.randn(shape, generator=generator, dtype=dtype, device=draw_on)
    d = d / per_example(flat_norm(d).clamp_min(NORM_FLOOR), len(shape))
    r = torch.rand(shape[0], generator=generator, dtype=dtype, device=draw_on) ** (1.0 / math.prod(shape[1:]))
    return _to(d * per_example(eps * r, len(shape)), device)


def _to(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    return t.to(device) if device is not None else t


def project_delta(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """``delta`` projected onto the ``norm`` eps-ball (coordinate clamp for linf, radial shrink for l2)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = per_example(flat_norm(delta), delta)
    return delta * torch.clamp(eps / n.clamp_min(NORM_FLOOR), max=1.0)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str,
            box: tuple[float, float] | None = (0.0, 1.0)) -> torch.Tensor:
    """``x_adv`` projected onto the eps-ball around ``x`` intersected with ``box``: for ``x`` inside the box,
    clamping ``x + delta`` into it only shrinks each coordinate of ``delta``, so the point stays in the ball."""
    out = x + project_delta(x_adv - x, eps, norm)
    return out if box is None else out.clamp(*box)


def clamp_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float,
               box: tuple[float, float] | None = (0.0, 1.0)) -> torch.Tensor:
    """The linf projection as coordinate clamps, ``min(max(x_adv, x - eps), x + eps)``, then into ``box`` (no
    round-off from forming ``x + delta``; for ``x`` inside the box the same point as ``torch.clamp`` to
    ``linf_box``)."""
    out = torch.min(torch.max(x_adv, x - eps), x + eps)
    return out if box is None else out.clamp(*box)


def linf_box(x: torch.Tensor, eps: float, box: tuple[float, float] = (0.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` of the linf eps-ball around ``x`` intersected with ``box``: ``torch.clamp(x_adv, lo, hi)``
    is then the projection (for ``x`` inside the box), one op per step."""
    return (x - eps).clamp_(min=box[0]), (x + eps).clamp_(max=box[1])


def ascent_direction(grad: torch.Tensor, norm: str, floor: float = NORM_FLOOR) -> torch.Tensor:
    """The steepest-ascent direction of unit ``norm``-size: ``sign(grad)`` (linf) or ``grad / ||grad||_2`` (l2)."""
    if norm == "linf":
        return grad.sign()
    return grad / per_example(flat_norm(grad).clamp_min(floor), grad)


def ascent_step(x: torch.Tensor, grad: torch.Tensor, step_size: float, norm: str) -> torch.Tensor:
    """``x + step_size * ascent_direction(grad)`` (for l2 the step multiplies the gradient before it is
    normalised: the order PGD has always used, kept so attacks reproduce bit for bit)."""
    if norm == "linf":
        return x + step_size * grad.sign()
    return x + step_size * grad / per_example(flat_norm(grad).clamp_min(NORM_FLOOR), grad)
