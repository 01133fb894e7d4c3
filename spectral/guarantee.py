"""Guarantee labels: every number archlip reports says what kind of number it is."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch


class Guarantee(str, Enum):
    """What a reported value promises about the true quantity ``q``.

    - ``EXACT``: equals ``q`` up to floating-point round-off.
    - ``UPPER``: a certified upper bound, ``value >= q`` deterministically.
    - ``LOWER``: a certified lower bound, ``value <= q`` (e.g. a Rayleigh quotient or an observed ratio).
    - ``PROBABILISTIC_UPPER``: ``value >= q`` with probability at least ``1 - failure_probability``.
    - ``ESTIMATE``: no guarantee in either direction (power-iterated surrogates, CLEVER, random-matrix laws).
    """

    EXACT = "exact"
    UPPER = "certified_upper"
    LOWER = "lower"
    PROBABILISTIC_UPPER = "probabilistic_upper"
    ESTIMATE = "estimate"

    def __str__(self) -> str:  # json/csv friendly
        return self.value


@dataclass(frozen=True)
class NormValue:
    """One labelled number: a norm, a bound or an estimate, with how it was obtained."""

    value: float
    guarantee: Guarantee
    method: str
    iterations: int | None = None
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.guarantee, Guarantee):
            raise TypeError(f"guarantee must be a Guarantee, got {self.guarantee!r}")
        if math.isnan(self.value):
            raise ValueError(f"method {self.method!r} produced NaN; check the weights for NaN/Inf")

    def __repr__(self) -> str:
        """Short, for notebooks: the number, its guarantee and method; ``details`` by key only (it may hold
        warm-start vectors with thousands of entries)."""
        text = f"NormValue({self.value:.6g}, {self.guarantee.value}, method={self.method!r}"
        if self.iterations is not None:
            text += f", iterations={self.iterations}"
        if self.seconds:
            text += f", seconds={self.seconds:.3g}"
        if self.details:
            keys = list(self.details)
            text += f", details: {', '.join(map(str, keys[:6]))}{', ...' if len(keys) > 6 else ''}"
        return text + ")"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; warm-start vectors and other large tensors in ``details`` are left out."""
        return {"value": json_safe(self.value), "guarantee": self.guarantee.value, "method": self.method,
                "iterations": self.iterations, "seconds": self.seconds, "details": json_safe(self.details)}


def json_safe(value: Any, nonfinite: str = "default") -> Any:
    """``value`` with only JSON types: Guarantee -> its label, tensors of <= 64 entries -> lists (larger ones
    are dropped from dicts and named by shape in lists), other scalars via ``.item()``, unknown objects via
    ``str``. Non-finite floats, ``nonfinite="default"``: NaN -> None (no value), +-inf -> "inf"/"-inf" (unbounded),
    the one rule of archlip's result files (``experiments.io.to_jsonable`` writes the same); ``"str"``: every
    non-finite float as its string; ``"null"``: every one as None.
    """
    def convert(v: Any) -> Any:
        if isinstance(v, Guarantee):
            return v.value
        if isinstance(v, bool) or v is None or isinstance(v, (str, int)):
            return v
        if isinstance(v, float):
            if math.isfinite(v):
                return v
            return None if nonfinite == "null" or (nonfinite == "default" and math.isnan(v)) else str(v)
        if isinstance(v, dict):
            return {str(k): convert(x) for k, x in v.items() if not (torch.is_tensor(x) and x.numel() > 64)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if torch.is_tensor(v):
            return convert(v.tolist()) if v.numel() <= 64 else f"tensor{tuple(v.shape)}"
        if hasattr(v, "item"):
            return convert(v.item())
        return str(v)

    if nonfinite not in ("default", "str", "null"):
        raise ValueError(f"nonfinite must be 'default', 'str' or 'null', got {nonfinite!r}")
    return convert(value)
