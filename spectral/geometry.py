"""Convolution geometry in one place: per-axis sizes, padding pairs, tap offsets and their Fourier phases.

Along one spatial axis a convolution with ``k`` taps, stride ``s``, dilation ``d`` and padding ``(p0, p1)``
reads, for output ``o``, the inputs ``s o + t_a`` with tap offsets ``t_a = d a - p0`` (``a = 0 .. k-1``).
The polyphase form splits each offset as ``t = s q + r`` (coarse shift ``q``, input phase ``0 <= r < s``):
the strided convolution is a stride-1 convolution on the coarse grid with ``s`` input phases. On a coarse
circular grid of ``m`` points the tap's phase at frequency ``u`` is ``exp(sign 2 pi i u q / m)``.

Used by ``spectral.exact``, ``spectral.upper``, ``spectral.operators``, ``spectral.circulant``,
``spectral.toeplitz`` and ``lipschitz.liplt``. References: Sedghi, Gupta & Long (2019); Senderovich et al.
(2022) (polyphase strides).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["as_tuple", "padding_pairs", "conv_output_size", "smallest_multiple", "tap_offsets", "polyphase",
           "tap_phases"]


def as_tuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    """``value`` as ``n`` ints: an int is repeated, a 1-tuple is broadcast; any other length is an error."""
    if isinstance(value, int):
        out = (value,) * n
    else:
        out = tuple(int(v) for v in value)
        if len(out) == 1 and n > 1:
            out = out * n
    if len(out) != n:
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    return out


def padding_pairs(
    padding: int | str | Sequence[int], kernel_size: Sequence[int], dilation: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """Per spatial dimension ``(before, after)`` padding, resolving PyTorch's "same"/"valid" strings."""
    n = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            return tuple((0, 0) for _ in range(n))
        if padding == "same":
            pairs = []
            for k, d in zip(kernel_size, dilation):
                total = d * (k - 1)
                pairs.append((total // 2, total - total // 2))
            return tuple(pairs)
        raise ValueError(f"padding string must be 'same' or 'valid', got {padding!r}")
    if not isinstance(padding, int) and len(tuple(padding)) == 2 * n:
        flat = tuple(int(p) for p in padding)
        return tuple((flat[2 * i], flat[2 * i + 1]) for i in range(n))
    sym = as_tuple(padding, n, "padding")
    if any(p < 0 for p in sym):
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return tuple((p, p) for p in sym)


def conv_output_size(n: int, k: int, stride: int = 1, dilation: int = 1, pad_before: int = 0,
                     pad_after: int = 0) -> int:
    """Output length of a convolution along one axis, ``(n + p0 + p1 - d (k - 1) - 1) // s + 1`` (as
    PyTorch); a value below 1 means the dilated kernel does not fit the padded input."""
    return (n + pad_before + pad_after - dilation * (k - 1) - 1) // stride + 1


def smallest_multiple(at_least: int, s: int) -> int:
    """The smallest multiple of ``s`` that is ``>= at_least`` (a grid the stride divides)."""
    return -(-at_least // s) * s


def tap_offsets(k: int, dilation: int = 1, shift: int = 0, modulus: int | None = None) -> torch.Tensor:
    """Input offsets ``t_a = dilation * a - shift`` of the ``k`` taps (int64), reduced mod ``modulus`` if given
    (the tap positions of a circular convolution on a grid of that size)."""
    t = dilation * torch.arange(k) - shift
    return t % modulus if modulus is not None else t


def polyphase(offsets: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, r)`` with ``offsets = s q + r`` and ``0 <= r < s`` (floor division; negative offsets too)."""
    q = torch.div(offsets, s, rounding_mode="floor")
    return q, offsets - q * s


def tap_phases(freqs: torch.Tensor, q: torch.Tensor, r: torch.Tensor, n_phases: int, m: float,
               sign: float = -1.0) -> torch.Tensor:
    """``E[f, a, p] = exp(sign 2 pi i freqs[f] q_a / m)`` where ``p = r_a`` (tap ``a`` reads input phase
    ``r_a``), else 0: complex128, shape ``(F, K, n_phases)``. ``freqs`` may be fractional (twisted grids).

    Contracting a kernel's taps with ``E`` gives the frequency blocks of its (polyphase) circular form."""
    angle = sign * 2 * math.pi * (freqs.to(torch.float64)[:, None] * q[None, :].to(torch.float64)) / m
    E = torch.zeros(len(freqs), len(q), n_phases, dtype=torch.complex128)
    E[:, torch.arange(len(q)), r] = torch.polar(torch.ones_like(angle), angle)
    return E
