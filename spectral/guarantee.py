"""Guarantee labels: every number archlip reports says what kind of number it is."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["guarantee"] = self.guarantee.value
        return d
