"""Learning-rate schedules as pure functions of the (fractional) epoch.

The loop sets ``lr_at(...)`` on every optimiser step with ``epoch = epoch_index + batch / batches``, so the
schedule state is just the step counter (nothing else to checkpoint).

References: Loshchilov & Hutter 2017 (cosine annealing); Goyal et al. 2017 (linear warm-up); Smith 2017
(cyclical learning rates), Wong et al. 2020 (its one-cycle use for FGSM-RS).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

SCHEDULES = ("constant", "multistep", "cosine", "cyclic")


def _constant(base_lr: float, epoch: float, total: float, **_: object) -> float:
    return base_lr


def _multistep(base_lr: float, epoch: float, total: float, *, milestones: Sequence[float] = (),
               gamma: float = 0.1, **_: object) -> float:
    passed = sum(1 for m in milestones if epoch >= m)
    return base_lr * gamma**passed


def _cosine(base_lr: float, epoch: float, total: float, *, min_lr: float = 0.0, warmup_epochs: float = 0.0,
            **_: object) -> float:
    span = max(total - warmup_epochs, 1e-12)
    progress = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _cyclic(base_lr: float, epoch: float, total: float, *, warmup_epochs: float = 0.0, **_: object) -> float:
    """One triangle: 0 -> base_lr linearly until the peak (``warmup_epochs``, default half the run) -> 0 at the end."""
    peak = warmup_epochs if warmup_epochs > 0 else total / 2
    if epoch <= peak:
        return base_lr * epoch / max(peak, 1e-12)
    return base_lr * max(total - epoch, 0.0) / max(total - peak, 1e-12)


_SCHEDULES: dict[str, Callable[..., float]] = {"constant": _constant, "multistep": _multistep, "cosine": _cosine,
                                               "cyclic": _cyclic}


def lr_at(name: str, base_lr: float, epoch: float, total_epochs: float, *, milestones: Sequence[float] = (),
          gamma: float = 0.1, warmup_epochs: float = 0.0, min_lr: float = 0.0) -> float:
    """Learning rate at fractional ``epoch`` (0 <= epoch <= total_epochs).

    ``multistep``: ``base_lr * gamma^(#milestones <= epoch)``; ``cosine``: from base_lr to min_lr over the
    epochs after warm-up; ``constant``; ``cyclic``: one triangle from 0 up to base_lr at ``warmup_epochs``
    (default: half the run) and back down to 0 at the end (Smith 2017; Wong et al. 2020's FGSM-RS schedule).
    Warm-up otherwise multiplies by ``epoch / warmup_epochs`` while below it.
    """
    if name not in _SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    lr = _SCHEDULES[name](base_lr, epoch, total_epochs, milestones=milestones, gamma=gamma, min_lr=min_lr,
                          warmup_epochs=warmup_epochs)
    if warmup_epochs > 0 and epoch < warmup_epochs and name != "cyclic":
        lr = lr * epoch / warmup_epochs
    return lr


def lr_from_config(schedule, base_lr: float, epoch: float, total_epochs: float) -> float:
    """:func:`lr_at` with the fields of an ``experiments.config.ScheduleConfig``."""
    return lr_at(schedule.name, base_lr, epoch, total_epochs, milestones=schedule.milestones, gamma=schedule.gamma,
                 warmup_epochs=schedule.warmup_epochs, min_lr=schedule.min_lr)
