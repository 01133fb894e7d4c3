"""Up-front duration estimates for evaluations: measured model costs times a work model of each attack.

``measure_unit_costs`` times the model's forward pass and forward+backward pass on a small and a larger batch of
the evaluation's own inputs (a second or less on small models) and fits ``seconds = per_call + rows *
per_row``. Each attack declares its work per point (``experiments.autoattack_engine.Work``: forward passes,
forward+backward passes, loop iterations per batch); ``estimate_duration`` multiplies them out for the points
the attack sees. Gradient attacks (PGD, CW, the Lipschitz metric) see every point; AutoAttack sees the correctly
classified ones and is counted as if every one of them stayed robust to the end, which is its worst case (it
stops attacking broken points). The estimate is labelled an estimate: machine load changes it.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from experiments.autoattack_engine import Work, frozen_parameters

SUGGESTED_N = (1000, 500, 200, 100, 50, 20, 10)
LONG_SECONDS = 300.0


@dataclass(frozen=True)
class UnitCosts:
    """Seconds per model call and per row, for forward passes and forward+backward (input gradient) passes."""

    forward_call: float
    forward_row: float
    backward_call: float
    backward_row: float
    rows: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("forward_call", "forward_row", "backward_call", "backward_row")} | {
            "rows_timed": list(self.rows)}


@dataclass(frozen=True)
class PlannedAttack:
    """One attack of the plan: its work per point and which points it sees ("all" or "correct")."""

    name: str
    work: Work
    points: str
    batch_size: int


def _timed(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Median wall seconds of ``fn()`` (after one warm-up call): what the run will see, load included."""
    fn()  # warm-up (kernel selection, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_unit_costs(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> UnitCosts:
    """Time ``model`` on 2 rows and on up to 64 rows of ``x`` (fewer when one pass over 8 rows already takes
    more than half a second), forward only and forward+backward to the input."""
    x = x.to(device)

    def forward(k: int) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return model(x[:k])
        return run

    def backward(k: int) -> Callable[[], Any]:
        def run() -> Any:
            xr = x[:k].clone().requires_grad_()
            with torch.enable_grad():
                return torch.autograd.grad(model(xr).sum(), [xr])
        return run

    with frozen_parameters(model):
        big = min(x.shape[0], batch_size, 64)
        if big > 8 and _timed(backward(8), repeats=1) > 0.5:
            big = 8
        small = min(2, big)
        f0, f1 = _timed(forward(small)), _timed(forward(big))
        b0, b1 = _timed(backward(small)), _timed(backward(big))
    if big == small:
        return UnitCosts(0.0, f1 / big, 0.0, b1 / big, (small, big))
    f_row, b_row = max(f1 - f0, 0.0) / (big - small), max(b1 - b0, 0.0) / (big - small)
    return UnitCosts(max(f0 - small * f_row, 0.0), f_row, max(b0 - small * b_row, 0.0), b_row, (small, big))


def _seconds(item: PlannedAttack, rows: int, costs: UnitCosts) -> float:
    if rows <= 0:
        return 0.0
    w = item.work
    per_iteration = costs.backward_call if w.forward_backward else costs.forward_call
    batches = math.ceil(rows / item.batch_size)
    return batches * w.iterations * per_iteration + rows * (w.forward * costs.forward_row
                                                            + w.forward_backward * costs.backward_row)


def _format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"~{max(seconds, 1):.0f} s"
    if seconds < 90 * 60:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


@dataclass
class DurationEstimate:
    """Estimated seconds of an evaluation (per attack and in total) and the figures behind them."""

    n: int
    correct_fraction: float
    device: str
    costs: UnitCosts
    plan: list[PlannedAttack]
    per_attack: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.per_attack = {item.name: self.seconds_for_attack(item, self.n) for item in self.plan}

    @property
    def seconds(self) -> float:
        return float(sum(self.per_attack.values()))

    def seconds_for_attack(self, item: PlannedAttack, n: int) -> float:
        rows = n if item.points == "all" else math.ceil(n * self.correct_fraction)
        return _seconds(item, rows, self.costs)

    def seconds_for(self, n: int) -> float:
        """Estimated seconds for the same evaluation on ``n`` points."""
        return float(sum(self.seconds_for_attack(item, n) for item in self.plan))

    def suggestion(self, limit: float = LONG_SECONDS) -> int | None:
        """A round number of points that takes at most ``limit`` seconds, when the full run takes longer."""
        if self.seconds <= limit:
            return None
        for n in SUGGESTED_N:
            if n < self.n and self.seconds_for(n) <= limit:
                return n
        return min(SUGGESTED_N[-1], self.n - 1) if self.n > 1 else None

    def describe(self, n_flag: str = "n=") -> str:
        """One line: "estimated ~55 min on cpu for 359 points ...; --n 100: ~15 min"."""
        text = (f"estimated {_format_seconds(self.seconds)} on {self.device} for {self.n} points "
                f"(worst case: AutoAttack counted as if every point stayed robust)")
        n = self.suggestion()
        if n is not None:
            sep = "" if n_flag.endswith("=") else " "
            text += f"; {n_flag}{sep}{n}: {_format_seconds(self.seconds_for(n))}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "guarantee": "estimate", "per_attack": dict(self.per_attack),
                "n": self.n, "device": self.device, "unit_costs": self.costs.to_dict(),
                "assumption": "AutoAttack: every correctly classified point stays robust (its worst case)"}


def estimate_duration(costs: UnitCosts, plan: list[PlannedAttack], n: int, correct_fraction: float,
                      device: str) -> DurationEstimate:
    """The estimate for ``plan`` on ``n`` points of which ``correct_fraction`` are classified correctly."""
    return DurationEstimate(n=n, correct_fraction=correct_fraction, device=device, costs=costs, plan=list(plan))
