"""Exponential moving average of model weights, with batch-norm statistics handled explicitly.

References: Polyak & Juditsky 1992; Tarvainen & Valpola 2017 (decay warm-up ``(1+n)/(10+n)``);
Gowal et al. 2020 / Rebuffi et al. 2021 (weight averaging for adversarial training).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

EMA_BN_MODES = ("ema", "copy")


def ema_decay(decay: float, updates: int, warmup: bool) -> float:
    """Effective decay after ``updates`` updates: ``min(decay, (1+n)/(10+n))`` with warm-up, else ``decay``."""
    return min(decay, (1.0 + updates) / (10.0 + updates)) if warmup else decay


class ModelEMA:
    """Holds ``shadow``, an eval-mode copy of the model whose parameters track ``decay``-averages.

    Floating buffers (batch-norm running mean/var) are averaged too with ``bn="ema"`` or copied from the
    live model with ``bn="copy"``; integer buffers (``num_batches_tracked``) are always copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True, bn: str = "ema") -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if bn not in EMA_BN_MODES:
            raise ValueError(f"unknown EMA bn mode {bn!r}; valid: {', '.join(EMA_BN_MODES)}")
        self.decay, self.warmup, self.bn = decay, warmup, bn
        self.shadow = copy.deepcopy(model).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = ema_decay(self.decay, self.updates, self.warmup)
        live = dict(model.named_parameters())
        for name, p in self.shadow.named_parameters():
            p.lerp_(live[name].detach(), 1.0 - d)
        live_buffers = dict(model.named_buffers())
        for name, b in self.shadow.named_buffers():
            src = live_buffers[name].detach()
            if self.bn == "ema" and b.is_floating_point():
                b.lerp_(src, 1.0 - d)
            else:
                b.copy_(src)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"shadow": self.shadow.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state["shadow"])
        self.updates = int(state["updates"])
