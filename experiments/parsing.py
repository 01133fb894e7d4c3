"""Readers of command-line values (counts, fractions, shapes, lists, ranges) and the project's user error.

Every reader returns the parsed value or raises :class:`UserError` with one line that says what was wrong and
how to write it; the CLI prints that line and exits with status 2.
"""
from __future__ import annotations

import logging
import math
import re
from fractions import Fraction

from experiments.errors import UserError

LOG = logging.getLogger("archlip")


_SUFFIX = {"": 1, "k": 10**3, "K": 10**3, "m": 10**6, "M": 10**6, "g": 10**9, "G": 10**9, "b": 10**9, "B": 10**9}


def parse_count(text: str | int | float) -> int:
    """``"68M"`` -> 68_000_000, ``"1.5k"`` -> 1500, ``"46160000"`` -> 46160000."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise UserError(f"count must be positive, got {text}")
        return int(round(text))
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMgGbB]?)\s*", str(text))
    if not match:
        raise UserError(f"cannot read {text!r} as a count; write e.g. 68M, 1.5k or 46160000")
    value = float(match.group(1)) * _SUFFIX[match.group(2)]
    if value <= 0:
        raise UserError(f"count must be positive, got {text!r}")
    return int(round(value))


def parse_fraction(text: str | float) -> float:
    """``"8/255"`` -> 0.03137..., ``"0.031"`` -> 0.031."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    try:
        return float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise UserError(f"cannot read {text!r} as a number; write e.g. 8/255 or 0.031") from None


def parse_int_list(text: str) -> tuple[int, ...]:
    """``"5,5,5"`` -> (5, 5, 5)."""
    try:
        values = tuple(int(v) for v in str(text).replace(" ", "").split(",") if v != "")
    except ValueError:
        raise UserError(f"cannot read {text!r} as integers; write e.g. 5,5,5") from None
    if not values:
        raise UserError(f"empty list {text!r}; write e.g. 5,5,5")
    return values


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3x32x32"`` or ``"3,32,32"`` -> (3, 32, 32); an empty or dangling part (``"1x8x8x"``) is an error."""
    cleaned = str(text).strip().lower().replace(" ", "")
    if not re.fullmatch(r"[0-9]+(?:[x,*][0-9]+)*", cleaned):
        raise UserError(f"cannot read {text!r} as an input shape; write e.g. 3x32x32 (no batch dimension)")
    shape = tuple(int(p) for p in re.split(r"[x,*]", cleaned))
    if any(s <= 0 for s in shape):
        raise UserError(f"input shape {text!r} must be positive integers, e.g. 3x32x32")
    return shape


def parse_rtol(value: float) -> float:
    """A sandwich tolerance: the target relative gap upper/lower - 1, in (0, 1]."""
    if not math.isfinite(value) or not 0 < value <= 1:
        raise UserError(f"--rtol {value:g} is out of range; give the target relative gap upper/lower - 1 in (0, 1], "
                        f"e.g. 0.02")
    return value


def parse_eps(text: str, norm: str = "linf") -> float:
    """``--eps`` as a radius for [0, 1] inputs (linf: at most 1; a warning above 0.5)."""
    from experiments.config import ConfigError, check_eps

    eps = parse_fraction(text)
    try:
        warning = check_eps(eps, norm, "--eps")
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    if warning:
        LOG.warning(f"warning: {warning}")
    return eps


def check_positive(value: int | None, flag: str, allow_zero: bool = False) -> int | None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UserError(f"{flag} must be {'>= 0' if allow_zero else 'a positive integer'}, got {value}")
    return value


def parse_attacks(text: str) -> list[str]:
    """``"pgd20,cw20,aa"`` -> ["pgd20", "cw20", "aa"]."""
    names = [a.strip() for a in str(text).split(",") if a.strip()]
    if not names:
        raise UserError("--attacks is empty; write e.g. --attacks pgd20,cw20,aa")
    return names


def parse_range(text: str, what: str) -> tuple[int, int]:
    """``"2-10"`` -> (2, 10); ``"5"`` -> (5, 5)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
    if not match or int(match.group(1)) < 1 or int(match.group(2) or match.group(1)) < int(match.group(1)):
        raise UserError(f"cannot read {text!r} as a {what} range; write e.g. 2-10 (low-high, low >= 1)")
    return int(match.group(1)), int(match.group(2) or match.group(1))
