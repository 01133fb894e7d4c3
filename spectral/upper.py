"""Certified upper bounds on the spectral norm of conv and linear layers (``Guarantee.UPPER``).

Every padded convolution is reduced to a circular one on an embedding grid ``N`` (see
``embedding``), whose per-frequency matrices are then bounded:

- zero padding: the layer on ``n`` is a submatrix of the circular convolution on any grid
  ``N >= n + p_before`` that also holds every tap (``N > (n_out-1) s + d (k-1) - p_before``) and
  ``n_out`` strided outputs (``s | N``): ``||zero(n)|| <= ||circ(N)||``;
- circular padding with ``s | n`` and at most ``n/s`` outputs: a row subset of ``circ(n)``;
- reflect / replicate (and any other circular case): ``conv_valid o P`` with ``P`` the padding map,
  ``||P|| = sqrt(max copies of one input entry)``, and ``conv_valid`` bounded like zero padding 0.

Methods (registry ``UPPER_METHODS``):
- ``"gram"``: Gram iteration per frequency of ``circ(N)`` with Frobenius rescaling in log space
  (Delattre, Barthelemy, Araujo & Allauzen, ICML 2023), max over frequencies; frequencies whose
  bound falls below a certified lower bound of the maximum are pruned (they cannot hold the max).
- ``"singla_feizi"``: ``sqrt(h w) * min`` of the four reshape norms (Singla & Feizi, ICLR 2021) of the
  polyphase kernel (``h x w = ceil(k / s)`` for stride ``s``).
- ``"symbol"``: input-size-free bound ``sup_omega ||K(omega)||`` over continuous frequencies:
  Gram bound on a grid times ``1/sqrt(1 - h^2/2)`` with ``h = pi (m1/N1 + m2/N2)`` from Bernstein's
  inequality (see docs/spectral.md). Holds for every input size.
- ``"tap_sum"``: ``sum_taps ||W_tap||_2``; ``"frobenius"``: ``sqrt(h w) ||W||_F``. Any padding.

Every value is computed in float64 (a float32 weight is converted exactly) and rounded up by a rigorous
round-off margin (``spectral.roundoff``: Gram iteration, block formation, Cholesky-verified matrix norms), so
it bounds the exact norm of the layer with the given weights. The fallbacks ``singla_feizi``, ``tap_sum`` and
``frobenius`` (and ``symbol``) see the stride through the polyphase kernel (``polyphase_kernel``). Power-iterated
quantities are never returned from this module.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from spectral.exact import iter_fourier_blocks, normalize_conv
from spectral.guarantee import Guarantee, NormValue
from spectral.geometry import (conv_output_size, padding_pairs, polyphase, smallest_multiple,
                               tap_offsets)
from spectral.operators import PADDING_MODES
from spectral.roundoff import (certified_matrix_norms, frobenius_upper, gamma, gram_margin_rel, tap_sum_error,
                               unit_roundoff)


# ---------------------------------------------------------------------------------------------
# geometry: which circular grid a padded convolution embeds into, and the padding map's norm
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvGeometry:
    """A conv layer reduced to ``pad_norm * circ(grid)`` (2-d form; conv1d has a singleton axis)."""

    weight: torch.Tensor  # (C_out, C_in/g, kh, kw)
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    padding: tuple[tuple[int, int], tuple[int, int]]
    padding_mode: str
    grid: tuple[int, int]
    pad_norm: float
    exact_circular: bool  # the layer IS circ(grid) (up to a cyclic shift)
    route: str
    nd: int = 2
    notes: list[str] = field(default_factory=list)


def zero_padding_grid(n: int, k: int, stride: int = 1, dilation: int = 1, pad_before: int = 0,
                      pad_after: int = 0) -> int:
    """Smallest circular grid ``N`` (a multiple of ``stride``) such that the zero-padded convolution
    on ``n`` is a submatrix of the circular convolution on ``N`` (proof in docs/spectral.md)."""
    n_out = conv_output_size(n, k, stride, dilation, pad_before, pad_after)
    if n_out < 1:
        raise ValueError(f"kernel {k} (dilation {dilation}) does not fit the padded input {n}+{pad_before}+{pad_after}")
    max_index = (n_out - 1) * stride + dilation * (k - 1) - pad_before
    return smallest_multiple(max(n + pad_before, max_index + 1, n_out * stride, n), stride)


def padding_map_norm(n: int, pad_before: int, pad_after: int, mode: str) -> float:
    """``||P||`` of a 1-d copy padding (circular/reflect/replicate): sqrt of the largest number of
    padded positions that copy one input entry (``P^T P`` is diagonal); 1 for zeros."""
    if mode == "zeros" or (pad_before == 0 and pad_after == 0):
        return 1.0
    idx = torch.arange(n, dtype=torch.float64).view(1, 1, n)
    padded = F.pad(idx, [pad_before, pad_after], mode=mode).flatten().long()
    return math.sqrt(torch.bincount(padded, minlength=n).max().item())


def embedding(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    padding_mode: str = "zeros",
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> ConvGeometry:
    """Reduce a padded convolution to ``pad_norm * circ(grid)`` (a certified upper-bound route)."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"unknown padding_mode {padding_mode!r}; valid: {', '.join(PADDING_MODES)}")
    nd = weight.dim() - 2 if isinstance(weight, torch.Tensor) else 2
    w4, size, s, d = normalize_conv(weight, input_size, stride, dilation, groups)
    kernel = tuple(w4.shape[2:])
    pads = padding_pairs(padding, kernel[:nd], d[:nd])
    if nd == 1:
        pads = (pads[0], (0, 0))
    if isinstance(padding, str) and padding == "same" and any(x != 1 for x in s):
        raise ValueError("padding='same' requires stride 1 (as in PyTorch)")
    out = []
    for n, (pl, pr), k, si, di in zip(size, pads, kernel, s, d):
        n_out = conv_output_size(n, k, si, di, pl, pr)
        if n_out < 1:
            raise ValueError(f"kernel (size {k}, dilation {di}) is larger than the padded input ({n}+{pl}+{pr})")
        if padding_mode == "reflect" and (pl >= n or pr >= n) and (pl or pr):
            raise ValueError(f"reflect padding {max(pl, pr)} must be < input size {n}")
        out.append(n_out)
    common = dict(weight=w4, input_size=size, output_size=tuple(out), stride=s, dilation=d, groups=groups,
                  padding=pads, padding_mode=padding_mode, nd=nd)
    if padding_mode == "zeros" or not any(p for pair in pads for p in pair):
        grid = tuple(zero_padding_grid(n, k, si, di, pl, pr)
                     for n, k, si, di, (pl, pr) in zip(size, kernel, s, d, pads))
        return ConvGeometry(grid=grid, pad_norm=1.0, exact_circular=False, route="zero_padding_submatrix", **common)
    if padding_mode == "circular" and all(n % si == 0 and o <= n // si for n, si, o in zip(size, s, out)):
        exact = all(o == n // si for n, si, o in zip(size, s, out))
        return ConvGeometry(grid=size, pad_norm=1.0, exact_circular=exact,
                            route="circular" if exact else "circular_row_subset", **common)
    # copy padding: conv_valid(padded grid) o P
    pad_norm = 1.0
    grid = []
    for n, k, si, di, (pl, pr) in zip(size, kernel, s, d, pads):
        pad_norm *= padding_map_norm(n, pl, pr, padding_mode)
        grid.append(zero_padding_grid(n + pl + pr, k, si, di, 0, 0))
    return ConvGeometry(grid=tuple(grid), pad_norm=pad_norm, exact_circular=False, route="valid_times_padding_norm",
                        notes=[f"{padding_mode} padding: bound = ||P|| * ||conv_valid||, ||P|| = {pad_norm:.4g}"],
                        **common)


# ---------------------------------------------------------------------------------------------
# Gram iteration on batches of matrices, in log space
# ---------------------------------------------------------------------------------------------
def gram_iteration_log_bounds(mats: torch.Tensor, n_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-matrix ``(log upper, log lower)`` bounds on the largest singular value after ``n_iter``
    Gram steps ``G <- G^H G`` with Frobenius rescaling (float64 logs; never overflows).

    upper = ``||G_t||_F^(1/2^t)`` times the accumulated scales (Delattre et al. 2023);
    lower = the same with ``||G_t||_F`` replaced by the largest column norm of ``G_t`` (a Rayleigh-type
    quotient, ``<= lambda_max``), used only for pruning.
    """
    ups, lows = _gram_steps(mats, n_iter, prune=False)
    return ups, lows


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    return torch.where(x > 0, torch.log(x.clamp_min(1e-300)), torch.full_like(x, -math.inf))


def _normalize(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.linalg.matrix_norm(G, ord="fro")
    safe = torch.where(r > 0, r, torch.ones_like(r))
    return G / safe[..., None, None], r


def _gram_steps(
    mats: torch.Tensor, n_iter: int, prune: bool, floor_log: float = -math.inf, tol: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram iteration with optional pruning against ``floor_log`` (a certified lower bound of the max).

    Returns per-matrix (log upper, log lower); pruned matrices keep the (smaller) bound they had when
    they were dropped, which is still a valid upper bound for them. With ``prune`` and ``tol > 0`` the
    iteration stops early once every remaining bound is within ``1 + tol`` of the lower bound of the max.
    """
    G, r = _normalize(mats)
    logs = _safe_log(r)
    up = logs.clone()
    colmax = torch.linalg.vector_norm(G, dim=-2).amax(-1)
    low = up + _safe_log(colmax)
    if n_iter == 0:
        return up, low
    if G.shape[-1] > G.shape[-2]:  # start with the smaller Gram matrix
        G = G.mH
    idx = torch.arange(G.shape[0])
    for t in range(1, n_iter + 1):
        G, r = _normalize(G.mH @ G)
        up_t = up[idx] + _safe_log(r) / 2**t
        colmax = torch.linalg.vector_norm(G, dim=-2).amax(-1)
        low_t = up_t + _safe_log(colmax) / 2**t
        up[idx] = torch.minimum(up[idx], up_t)
        low[idx] = torch.maximum(low[idx], low_t)
        if prune:
            floor_log = max(floor_log, low.max().item())
            keep = up[idx] >= floor_log
            if not bool(keep.all()):
                idx, G = idx[keep], G[keep]
                if idx.numel() == 0:
                    break
            if tol > 0 and up[idx].max().item() <= floor_log + math.log1p(tol):
                break
    return up, low


# ---------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------
def _fourier_gram(geo: ConvGeometry, n_iter: int, prune: bool = True, max_entries: int = 2**23,
                  tol: float = 0.0) -> tuple[float, dict]:
    """Max over the frequency blocks of ``circ(geo.grid)`` of Gram-iteration bounds, computed in complex128
    with a rigorous round-off margin (``spectral.roundoff``): relative ``gram_margin_rel`` for the iteration
    plus the absolute error of forming the blocks from the kernel."""
    w64 = geo.weight.detach().to(torch.float64)
    best_up = -math.inf
    floor = -math.inf
    n_freq = 0
    for blocks in iter_fourier_blocks(w64, geo.grid, geo.stride, geo.dilation, geo.groups,
                                      onesided=True, max_entries=max_entries):
        mats = blocks.reshape(-1, *blocks.shape[-2:])
        n_freq += blocks.shape[0]
        up, low = _gram_steps(mats, n_iter, prune=prune, floor_log=floor, tol=tol)
        floor = max(floor, low.max().item())
        best_up = max(best_up, up.max().item())
    value = math.exp(best_up) if best_up > -math.inf else 0.0
    rel = gram_margin_rel(max(w64.shape[0] // geo.groups, w64.shape[1] * geo.stride[0] * geo.stride[1]),
                          torch.float64)
    form = _block_formation_error(geo)
    details = {"frequencies": n_freq, "circulant_lower": math.exp(floor) if floor > -math.inf else 0.0,
               "roundoff_margin": value * rel + form, "computed_in": "float64"}
    return (value * (1 + rel) + form if value > 0 else 0.0), details


def _block_formation_error(geo: ConvGeometry) -> float:
    """``||B_computed(u) - B(u)||_2`` bound for the frequency blocks of ``iter_fourier_blocks`` (float64)."""
    w = geo.weight.detach().to(torch.float64)
    taps = w.reshape(w.shape[0], w.shape[1], -1)
    abs_sum = float(torch.linalg.vector_norm(taps, dim=(0, 1)).sum())
    k_max = max(d * (k - 1) for d, k in zip(geo.dilation, w.shape[2:])) + 1
    return tap_sum_error(abs_sum, taps.shape[-1], k_max, torch.float64)


def _method_gram(geo: ConvGeometry, n_iter: int | None = None, prune: bool = True, tol: float = 0.0,
                 **kw: Any) -> tuple[float, dict, int]:
    """``tol``: stop iterating once the bound is within ``1 + tol`` of the circulant's lower bound."""
    n_iter = 6 if n_iter is None else int(n_iter)
    if n_iter < 0 or tol < 0:
        raise ValueError(f"n_iter and tol must be >= 0, got n_iter={n_iter}, tol={tol}")
    value, details = _fourier_gram(geo, n_iter, prune=prune, tol=tol, **kw)
    details.update({"pruned": prune, "tol": tol})
    return value, details, n_iter


def polyphase_kernel(weight: torch.Tensor, stride: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """The kernel of the stride-1 convolution on polyphase inputs that equals a strided, dilated one.

    ``weight`` is ``(C_out, C_in, kh, kw)``; tap ``a`` sits at offset ``t = d a``, coarse offset ``q = t // s``
    and input phase ``r = t % s``. Returns ``(C_out, C_in * s1 * s2, K1, K2)`` (channels phase-major) with the
    coarse offsets divided by their common factor (a dilation of the coarse kernel changes no symbol-sup
    bound). On the infinite lattice the two operators are equal, so every bound on ``sup_omega ||K(omega)||``
    of the result bounds the strided layer (any padding, after ``embedding``). Stride 1: the undilated kernel.
    """
    c_out, c_in = weight.shape[:2]
    if all(s == 1 for s in stride):
        return weight
    axes = []
    for k, s, d in zip(weight.shape[2:], stride, dilation):
        q, r = polyphase(tap_offsets(k, d), s)
        g = math.gcd(*[int(x) for x in q]) if int(q.max()) > 0 else 1
        axes.append((q // g, r, s))
    (q1, r1, s1), (q2, r2, s2) = axes
    out = torch.zeros(c_out, s1 * s2, c_in, int(q1.max()) + 1, int(q2.max()) + 1, dtype=weight.dtype)
    for a in range(weight.shape[2]):
        for b in range(weight.shape[3]):
            out[:, int(r1[a]) * s2 + int(r2[b]), :, int(q1[a]), int(q2[b])] = weight[:, :, a, b]
    return out.reshape(c_out, s1 * s2 * c_in, out.shape[-2], out.shape[-1])


def _group_weights(geo: ConvGeometry) -> torch.Tensor:
    """Per-group polyphase kernels ``(g, o, i', K1, K2)`` in float64 (see ``polyphase_kernel``)."""
    w = geo.weight.detach().to(torch.float64)
    wg = w.reshape(geo.groups, w.shape[0] // geo.groups, *w.shape[1:])
    return torch.stack([polyphase_kernel(x, geo.stride, geo.dilation) for x in wg])


def _method_singla_feizi(geo: ConvGeometry, **kw: Any) -> tuple[float, dict, int | None]:
    wg = _group_weights(geo)  # (g, o, i, h, w), stride-aware (polyphase)
    g, o, i, h, w = wg.shape
    reshapes = {
        "R": wg.permute(0, 1, 3, 2, 4).reshape(g, o * h, i * w),
        "S": wg.permute(0, 1, 4, 2, 3).reshape(g, o * w, i * h),
        "T": wg.reshape(g, o, i * h * w),
        "U": wg.permute(0, 1, 3, 4, 2).reshape(g, o * h * w, i),
    }
    norms = {k: float(certified_matrix_norms(v).max()) for k, v in reshapes.items()}
    value = math.sqrt(h * w) * min(norms.values()) * (1 + gamma(8, unit_roundoff(torch.float64)))
    return value, {"reshape_norms": norms, "polyphase_kernel": [h, w], "computed_in": "float64"}, None


def bernstein_factor(degree: Sequence[int], grid: Sequence[int]) -> float:
    """``1/sqrt(1 - h^2/2)``, ``h = pi * sum(m_i / N_i)``: sup over all frequencies of ``||K(omega)||``
    is at most this factor times its max over the ``N1 x N2`` grid (docs/spectral.md)."""
    h = math.pi * sum(m / n for m, n in zip(degree, grid))
    if h * h / 2 >= 1:
        raise ValueError(f"symbol grid {tuple(grid)} too coarse for kernel degree {tuple(degree)}; use a finer grid")
    return 1.0 / math.sqrt(1 - h * h / 2)


def _method_symbol(geo: ConvGeometry, n_iter: int | None = None, grid: int | Sequence[int] | None = None,
                   slack: float = 0.05, **kw: Any) -> tuple[float, dict, int]:
    """Symbol sup of the stride-aware (polyphase) kernel: a bound for every input size."""
    n_iter = 8 if n_iter is None else int(n_iter)
    wg = _group_weights(geo)
    g, o, i, kh, kw_ = wg.shape
    degree = (kh - 1, kw_ - 1)
    if grid is None:
        # smallest square-ish grid with factor <= 1 + slack
        target = math.sqrt(2 * (1 - 1 / (1 + slack) ** 2)) / math.pi
        sym_grid = tuple(max(1, math.ceil(len([m for m in degree if m]) * m / target)) if m else 1 for m in degree)
    else:
        sym_grid = tuple(grid) if not isinstance(grid, int) else (grid, grid if geo.nd == 2 else 1)
    factor = bernstein_factor(degree, sym_grid)
    sym_geo = ConvGeometry(**{**geo.__dict__, "weight": wg.reshape(g * o, i, kh, kw_), "grid": sym_grid,
                              "stride": (1, 1), "dilation": (1, 1)})
    value, details = _fourier_gram(sym_geo, n_iter, prune=True)
    details.update({"symbol_grid": list(sym_grid), "bernstein_factor": factor, "grid_max": value,
                    "polyphase_kernel": [kh, kw_]})
    return value * factor * (1 + gamma(4, unit_roundoff(torch.float64))), details, n_iter


def _method_tap_sum(geo: ConvGeometry, **kw: Any) -> tuple[float, dict, None]:
    wg = _group_weights(geo)
    taps = wg.permute(0, 3, 4, 1, 2)  # (g, h, w, o, i): one block per coarse offset (all phases together)
    per_group = certified_matrix_norms(taps).sum(dim=(1, 2))
    value = per_group.max().item() * (1 + gamma(taps.shape[1] * taps.shape[2] + 4, unit_roundoff(torch.float64)))
    return value, {"computed_in": "float64"}, None


def _method_frobenius(geo: ConvGeometry, **kw: Any) -> tuple[float, dict, None]:
    wg = _group_weights(geo)
    h, w = wg.shape[-2:]
    per_group = max(frobenius_upper(x) for x in wg)
    return math.sqrt(h * w) * per_group * (1 + gamma(4, unit_roundoff(torch.float64))), {}, None


UPPER_METHODS: dict[str, Callable[..., tuple[float, dict, int | None]]] = {
    "gram": _method_gram,
    "singla_feizi": _method_singla_feizi,
    "symbol": _method_symbol,
    "tap_sum": _method_tap_sum,
    "frobenius": _method_frobenius,
}

REFERENCES = {
    "gram": "Delattre, Barthelemy, Araujo & Allauzen, ICML 2023 (Gram iteration)",
    "singla_feizi": "Singla & Feizi, ICLR 2021 (Fantastic Four)",
    "symbol": "Araujo, Negrevergne, Chevaleyre & Atif, ICLR 2021 (symbol sup); Bernstein's inequality",
    "tap_sum": "triangle inequality over kernel taps",
    "frobenius": "Cauchy-Schwarz over kernel taps",
}


def conv_operator_norm_upper(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    padding_mode: str = "zeros",
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    method: str = "gram",
    n_iter: int | None = None,
    **method_kw: Any,
) -> NormValue:
    """Certified upper bound on the spectral norm of a conv1d/conv2d layer at ``input_size``.

    ``input_size`` is the spatial size (int or tuple) or the full ``(C_in, H, W)`` shape.
    ``method`` is one of ``UPPER_METHODS``; ``n_iter`` sets Gram iterations for "gram"/"symbol".
    For reflect/replicate padding the bound includes the padding map's norm (``details["pad_norm"]``).
    References: see ``REFERENCES[method]``.
    """
    if method not in UPPER_METHODS:
        raise ValueError(f"unknown upper-bound method {method!r}; valid: {', '.join(UPPER_METHODS)}")
    t0 = time.perf_counter()
    geo = embedding(weight, input_size, stride, padding, padding_mode, dilation, groups)
    if method in ("gram", "symbol"):
        method_kw["n_iter"] = n_iter
    elif n_iter is not None:
        raise ValueError(f"n_iter only applies to 'gram' and 'symbol', not {method!r}")
    value, details, iters = UPPER_METHODS[method](geo, **method_kw)
    value *= geo.pad_norm
    nd = geo.nd
    details.update({
        "route": geo.route,
        "pad_norm": geo.pad_norm,
        "grid": list(geo.grid[:nd]),
        "input_size": list(geo.input_size[:nd]),
        "reference": REFERENCES[method],
    })
    if geo.notes:
        details["notes"] = geo.notes
    return NormValue(value=value, guarantee=Guarantee.UPPER, method=method, iterations=iters,
                     seconds=time.perf_counter() - t0, details=details)


def linear_operator_norm_upper(weight: torch.Tensor, n_iter: int = 12) -> NormValue:
    """Certified upper bound on ``||W||_2`` by Gram iteration on the matrix (Delattre et al. 2023), computed in
    float64 with a rigorous round-off margin (``spectral.roundoff.gram_margin_rel``)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-d tensor (out_features, in_features), got {getattr(weight, 'shape', weight)!r}")
    if weight.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"weight must be float32 or float64, got {weight.dtype}; convert it explicitly")
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    t0 = time.perf_counter()
    up, _ = _gram_steps(weight.detach().to(torch.float64)[None], n_iter, prune=False)
    value = math.exp(up.item()) if up.item() > -math.inf else 0.0
    value *= 1 + gram_margin_rel(max(weight.shape), torch.float64)
    return NormValue(value=value, guarantee=Guarantee.UPPER, method="gram", iterations=n_iter,
                     seconds=time.perf_counter() - t0,
                     details={"reference": REFERENCES["gram"], "computed_in": "float64"})


__all__ = [
    "UPPER_METHODS",
    "ConvGeometry",
    "embedding",
    "zero_padding_grid",
    "padding_map_norm",
    "bernstein_factor",
    "gram_iteration_log_bounds",
    "conv_operator_norm_upper",
    "linear_operator_norm_upper",
]
