"""Exact spectra: circular convolutions by FFT block-diagonalisation, anything small by dense SVD.

A circular (periodic) convolution on an ``n1 x n2`` grid is block-diagonalised by the 2-d DFT: its
singular values are the union, over the ``n1*n2`` frequencies, of the singular values of the
``C_out x C_in`` matrices ``K(u, v) = sum_{a,b} W[:, :, a, b] exp(-2 pi i (u t_a / n1 + v t_b / n2))``
where ``t_a = dilation * a mod n`` is the tap's position. A stride ``s`` (``n % s == 0``) is
handled by the polyphase reshape: the strided convolution on the ``n`` grid is a stride-1 circular
convolution on the ``n/s`` grid with ``s1*s2*C_in`` input channels (input phase ``r = t mod s``,
shifted tap ``q = t // s``). Groups give a block-diagonal operator: the spectrum is the union over
groups. Conv1d is the 2-d case with a singleton second axis.

References: Sedghi, Gupta & Long, "The Singular Values of Convolutional Layers", ICLR 2019;
Senderovich, Bulatova, Obukhov & Rakhuba, "Towards Practical Control of Singular Values of
Convolutional Layers", NeurIPS 2022 (polyphase strides).
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterator, Sequence

import torch

from spectral.geometry import as_tuple, polyphase, tap_offsets, tap_phases
from spectral.guarantee import Guarantee, NormValue
from spectral.operators import DEFAULT_MAX_ENTRIES, check_linear_map, dense_matrix
from spectral.roundoff import tap_sum_error, unit_roundoff

# frequency blocks produced per chunk (complex entries); bounds peak memory of the FFT methods
DEFAULT_CHUNK_ENTRIES = 2**24


def complex_dtype_for(dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float32:
        return torch.complex64
    if dtype == torch.float64:
        return torch.complex128
    raise TypeError(f"spectral methods need a float32 or float64 weight, got {dtype}; convert it explicitly")


def _pair(value: int | Sequence[int], nd: int, name: str) -> tuple[int, int]:
    vals = as_tuple(value, nd, name)
    if any(v < 1 for v in vals):
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return (vals[0], vals[1] if nd == 2 else 1)


def normalize_conv(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Validate a conv weight and sizes and return them in 2-d form.

    ``input_size`` is the spatial size (int or per-dim tuple); a full ``(C_in, H, W)`` shape is
    accepted too (its channel count is checked). Returns ``(weight4d, grid, stride, dilation)``.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() not in (3, 4):
        raise ValueError(f"conv weight must be 3-d (conv1d) or 4-d (conv2d), got shape {tuple(weight.shape)}")
    complex_dtype_for(weight.dtype)
    if not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups={groups!r} must be a positive int dividing C_out={weight.shape[0]}")
    nd = weight.dim() - 2
    if isinstance(input_size, int):
        size = (input_size,) * nd
    else:
        size = tuple(int(s) for s in input_size)
        if len(size) == nd + 1:
            if size[0] != weight.shape[1] * groups:
                raise ValueError(
                    f"input shape {size} has {size[0]} channels but the weight expects {weight.shape[1] * groups}"
                )
            size = size[1:]
    if len(size) != nd or any(s < 1 for s in size):
        raise ValueError(f"input_size must be an int or {nd} positive ints (spatial size), got {input_size!r}")
    w4 = weight.detach() if nd == 2 else weight.detach().unsqueeze(-1)
    grid = (size[0], size[1] if nd == 2 else 1)
    return w4, grid, _pair(stride, nd, "stride"), _pair(dilation, nd, "dilation")


def _tap_phases(
    k: int, d: int, n: int, s: int, freqs: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``E[u, a, r] = exp(-2 pi i u q_a / m)`` if tap ``a`` lands on input phase ``r`` else 0 (``m = n/s``)."""
    q, r = polyphase(tap_offsets(k, d, modulus=n), s)
    return tap_phases(freqs, q, r, s, n // s).to(dtype=dtype, device=device)


def iter_fourier_blocks(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    onesided: bool = True,
    max_entries: int = DEFAULT_CHUNK_ENTRIES,
) -> Iterator[torch.Tensor]:
    """Yield the per-frequency matrices of a circular convolution in chunks of frequencies.

    Each chunk has shape ``(F_chunk, groups, C_out/g, C_in/g * s1 * s2)`` (complex). With
    ``onesided=True`` only frequencies ``v <= m2 // 2`` are produced: for a real kernel the block at
    ``(-u, -v)`` is the complex conjugate of the block at ``(u, v)`` (same singular values), so the
    maximum over the half grid is the maximum over the full grid.
    """
    w4, grid, s, d = normalize_conv(weight, input_size, stride, dilation, groups)
    for n_i, s_i in zip(grid, s):
        if n_i % s_i:
            raise ValueError(
                f"stride {s_i} must divide the circular grid size {n_i} (polyphase reshape); "
                "use an input size divisible by the stride"
            )
    m1, m2 = grid[0] // s[0], grid[1] // s[1]
    cdt = complex_dtype_for(w4.dtype)
    c_out, c_in_g, kh, kw = w4.shape
    co = c_out // groups
    wg = w4.reshape(groups, co, c_in_g, kh, kw).to(cdt)
    v_freqs = torch.arange(m2 // 2 + 1 if onesided else m2)
    E2 = _tap_phases(kw, d[1], grid[1], s[1], v_freqs, cdt, w4.device)  # (F2, kw, s2)
    # contract the second spatial axis once: (g, o, i, a, F2, s2)
    T = torch.einsum("goiab,vbs->goiavs", wg, E2)
    per_u = len(v_freqs) * groups * co * c_in_g * s[0] * s[1]
    chunk = max(1, max_entries // max(per_u, 1))
    for start in range(0, m1, chunk):
        u_freqs = torch.arange(start, min(m1, start + chunk))
        E1 = _tap_phases(kh, d[0], grid[0], s[0], u_freqs, cdt, w4.device)  # (F1, kh, s1)
        blocks = torch.einsum("goiavs,uar->uvgoirs", T, E1)
        yield blocks.reshape(len(u_freqs) * len(v_freqs), groups, co, c_in_g * s[0] * s[1])


def conv_singular_values_circular(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """All singular values (descending, in the weight's dtype) of the circular convolution on the grid.

    The count equals ``min(rows, cols)`` of the unrolled operator. Bias is irrelevant. Requires
    ``input_size % stride == 0``. Computed in complex128 whatever the weight's dtype.
    References: Sedghi et al. 2019 (FFT block-diagonalisation); Senderovich et al. 2022 (polyphase stride).
    """
    w64 = _float64(weight)
    parts = [
        torch.linalg.svdvals(b).flatten()
        for b in iter_fourier_blocks(w64, input_size, stride, dilation, groups, onesided=False)
    ]
    return torch.sort(torch.cat(parts), descending=True).values.to(weight.dtype)


def conv_operator_norm_circular(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> NormValue:
    """Exact spectral norm of the circular convolution (max over frequencies and groups of the top
    singular value), computed in complex128 whatever the weight's dtype. ``details["error_bound"]`` states
    the absolute round-off: block formation (``spectral.roundoff.tap_sum_error``) plus the SVD's backward
    error ``4 max(p, q) u sigma`` (LAPACK's ``p(n) u ||B||`` with ``p(n) = 4n``, an estimate, not a proof).
    References: Sedghi et al. 2019; Senderovich et al. 2022."""
    t0 = time.perf_counter()
    best = 0.0
    n_freq = 0
    w64 = _float64(weight)
    block_shape = (0, 0)
    for b in iter_fourier_blocks(w64, input_size, stride, dilation, groups, onesided=True):
        n_freq += b.shape[0]
        block_shape = tuple(b.shape[-2:])
        best = max(best, torch.linalg.svdvals(b)[..., 0].max().item())
    w4, grid, s, d = normalize_conv(weight, input_size, stride, dilation, groups)
    taps = w4.to(torch.float64).reshape(w4.shape[0], w4.shape[1], -1)
    k_max = max(di * (k - 1) for di, k in zip(d, w4.shape[2:])) + 1
    form = tap_sum_error(float(torch.linalg.vector_norm(taps, dim=(0, 1)).sum()), taps.shape[-1], k_max,
                         torch.float64)
    err = form + 4 * max(block_shape) * unit_roundoff(torch.float64) * best
    return NormValue(
        value=best,
        guarantee=Guarantee.EXACT,
        method="fft_circular",
        iterations=None,
        seconds=time.perf_counter() - t0,
        details={"grid": list(grid[: weight.dim() - 2]), "stride": list(s[: weight.dim() - 2]),
                 "frequencies": n_freq, "groups": groups, "computed_in": "complex128", "error_bound": err},
    )


def _float64(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    complex_dtype_for(weight.dtype)  # refuses half precision etc. with a clear message
    return weight.detach().to(torch.float64)


def singular_values_dense(m: Any, max_entries: int = DEFAULT_MAX_ENTRIES) -> torch.Tensor:
    """All singular values (descending) of any linear map via its dense matrix."""
    return torch.linalg.svdvals(dense_matrix(m, max_entries=max_entries))


def operator_norm_dense(m: Any, max_entries: int = DEFAULT_MAX_ENTRIES, *, via: str = "svd",
                        dtype: torch.dtype | None = None) -> NormValue:
    """Exact spectral norm of any (small) linear map: largest singular value of its dense matrix, in ``dtype``
    (default: the map's dtype). ``via="svd"``: the matrix 2-norm; ``via="gram"``: the square root of the largest
    eigenvalue of the smaller Gram matrix (several times faster; its backward error ``O(n u ||A||^2)`` is of
    the same order). ``details["error_bound"]`` states ``4 max(m, n) u sigma`` (an estimate, not a proof)."""
    if via not in ("svd", "gram"):
        raise ValueError(f"unknown via {via!r}; valid: svd, gram")
    check_linear_map(m)
    t0 = time.perf_counter()
    A = dense_matrix(m, max_entries=max_entries)
    if dtype is not None:
        A = A.to(dtype)
    if not A.numel():
        value = 0.0
    elif via == "svd":
        value = torch.linalg.matrix_norm(A, ord=2).item()
    else:
        G = A.T @ A if A.shape[1] <= A.shape[0] else A @ A.T
        value = math.sqrt(max(float(torch.linalg.eigvalsh(G)[-1]), 0.0))
    u = unit_roundoff(A.dtype) if A.is_floating_point() else 0.0
    return NormValue(
        value=value,
        guarantee=Guarantee.EXACT,
        method="dense_svd" if via == "svd" else "dense_gram_eig",
        seconds=time.perf_counter() - t0,
        details={"shape": list(A.shape), "error_bound": 4 * max(A.shape, default=0) * u * value},
    )


__all__ = [
    "conv_singular_values_circular",
    "conv_operator_norm_circular",
    "operator_norm_dense",
    "singular_values_dense",
    "iter_fourier_blocks",
    "normalize_conv",
    "complex_dtype_for",
]
