"""LipLT-style bound of a two-layer piece ``u -> B u + A2 sigma(A1 u + c)`` with sigma(z) = a z + b |z|.

For ReLU a = b = 1/2 (LipLT, Fazlyab et al. 2023); LeakyReLU(s): a = (1+s)/2, b = (1-s)/2. Then
``L <= ||B + a A2 A1|| + b ||A2|| ||A1||``, where A1 = D2 conv1 D1 and A2 = D3 conv2 carry the folded
channel scalings and B is a shortcut (None, the identity or a conv/linear with the same input).

The linear term ``||B + a A2 A1||`` is certified either by a dense SVD (small operators, exact) or
through circular convolutions: a zero-padded conv is ``Z = R C E`` (embed, circular conv on a larger
grid, restrict), so ``Z2 Z1 = R C2 M C1 E`` with M a 0/1 spatial mask = (I + S)/2, S a +-1 diagonal;
hence ``||B + a Z2 Z1|| <= ||Bc + (a/2) C2 C1|| + (|a|/2) ||C2|| ||C1||``. Circular convolutions (also
strided ones, via the polyphase form) are block-diagonalised by the DFT, products and sums of them are
products and sums of their per-frequency symbols, so every circular norm above is exact by FFT.
Proof: docs/network-bounds.md.

References: Fazlyab, Entesari, Roy & Chellappa 2023, "Certified Robustness via Dynamic Margin
Maximization and Improved Lipschitz Regularization" (LipLT); Sedghi et al. 2019 (conv spectra by FFT).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from spectral.folding import fold_channel_scales
from spectral.geometry import polyphase, smallest_multiple, tap_offsets, tap_phases
from spectral.guarantee import Guarantee, NormValue

# relative margin on float64 SVD values (round-off of forming symbols and the SVD is ~1e-13 relative)
ROUNDOFF_MARGIN = 1e-9
DEFAULT_CHUNK_BYTES = 2**28
_REFERENCE = False  # True inside ``reference_path()``
_TERMS = "liplt_terms"  # the entry of a caller's cache holding whole circular LipLT results


@contextlib.contextmanager
def reference_path():
    """Use the previous circular LipLT computation (every frequency, no reuse of results) inside the block:
    for benchmarks and tests that compare the two in the same run."""
    global _REFERENCE
    saved, _REFERENCE = _REFERENCE, True
    try:
        yield
    finally:
        _REFERENCE = saved


@dataclass
class ConvSpec:
    """A conv/linear layer (as a 2-d conv, groups expanded) with input/output channel scales folded in."""

    weight: torch.Tensor  # (c_out, c_in, kh, kw), float64, dense over groups
    in_spatial: tuple[int, int]
    out_spatial: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]  # (left, right) per spatial axis
    dilation: tuple[int, int]
    padding_mode: str
    module: nn.Module | None = None
    groups: int = 1
    raw_weight: torch.Tensor | None = None  # the folded weight in the module's own layout (for spectral)

    @property
    def c_out(self) -> int:
        return int(self.weight.shape[0])

    @property
    def c_in(self) -> int:
        return int(self.weight.shape[1])


def _ungroup(weight: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return weight
    c_out, c_in_g = weight.shape[:2]
    co = c_out // groups
    full = weight.new_zeros((c_out, c_in_g * groups) + tuple(weight.shape[2:]))
    for g in range(groups):
        full[g * co:(g + 1) * co, g * c_in_g:(g + 1) * c_in_g] = weight[g * co:(g + 1) * co]
    return full


def fold_weight(module: nn.Module, in_scale: torch.Tensor | None, out_scale: torch.Tensor | None) -> torch.Tensor:
    """The module's weight (float64) times diag(out_scale) on the left and diag(in_scale) on the right."""
    return fold_channel_scales(module.weight, out_scale, in_scale, groups=getattr(module, "groups", 1))


def conv_spec(module: nn.Module, in_shape: Sequence[int], in_scale: torch.Tensor | None = None,
              out_scale: torch.Tensor | None = None) -> ConvSpec:
    """Describe a Conv1d/Conv2d/Linear at ``in_shape`` with folded channel scales as a 2-d conv."""
    from spectral.operators import LayerOperator

    op = LayerOperator.from_module(module, tuple(in_shape))
    w = fold_weight(module, in_scale, out_scale)
    if isinstance(module, nn.Linear):
        if len(in_shape) != 1:
            raise ValueError(f"linear layer {module} expects a flat input, got shape {tuple(in_shape)}")
        return ConvSpec(w.view(w.shape[0], w.shape[1], 1, 1), (1, 1), (1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1),
                        "zeros", module, 1, w)
    nd = w.dim() - 2
    w4 = _ungroup(w, module.groups)
    if nd == 1:
        w4 = w4.unsqueeze(-1)
    pad = tuple(op.padding) + (((0, 0),) if nd == 1 else ())
    return ConvSpec(w4, tuple(op.in_shape[1:]) + ((1,) if nd == 1 else ()),
                    tuple(op.out_shape[1:]) + ((1,) if nd == 1 else ()),
                    tuple(op.stride) + ((1,) if nd == 1 else ()), pad,
                    tuple(op.dilation) + ((1,) if nd == 1 else ()), op.padding_mode, module, module.groups, w)


def _phases(k: int, dil: int, pad_left: int, s: int, m: int, freqs: torch.Tensor,
            device: torch.device | None = None) -> torch.Tensor:
    """E[u, a, r] = exp(2 pi i u q_a / m) if tap a reads input phase r (offset t_a = a*dil - pad = s q_a + r)."""
    q, r = polyphase(tap_offsets(k, dil, shift=pad_left), s)
    E = tap_phases(freqs, q, r, s, m, sign=1.0)
    return E.to(device) if device is not None else E


def symbol(spec: ConvSpec, grid: tuple[int, int], u_freqs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-frequency matrices of the circular version of ``spec`` on ``grid`` (polyphase for strides).

    Returns (U, m2, c_out, c_in * s1 * s2) complex128, m = grid / stride, rows ``u_freqs`` of the m1 axis.
    The circular map sends x (on ``grid``) to y[i] = sum_a W[a] x[(s i + a d - p) mod N]; the polyphase
    split x_r[j] = x[s j + r] is a permutation, so these blocks give its singular values exactly.
    """
    (n1, n2), (s1, s2) = grid, spec.stride
    if n1 % s1 or n2 % s2:
        raise ValueError(f"circular grid {grid} must be divisible by the stride {spec.stride}")
    m1, m2 = n1 // s1, n2 // s2
    u = torch.arange(m1) if u_freqs is None else u_freqs
    kh, kw = spec.weight.shape[2:]
    dev = spec.weight.device
    E1 = _phases(kh, spec.dilation[0], spec.padding[0][0], s1, m1, u.cpu(), dev)
    E2 = _phases(kw, spec.dilation[1], spec.padding[1][0], s2, m2, torch.arange(m2), dev)
    K = torch.einsum("ocab,uax,vby->uvocxy", spec.weight.to(torch.complex128), E1, E2)
    return K.reshape(len(u), m2, spec.c_out, spec.c_in * s1 * s2)


def _min_grid(n: int, pads: tuple[int, int], s: int) -> int:
    return smallest_multiple(n + max(pads), s)


def liplt_grid(conv1: ConvSpec, conv2: ConvSpec, shortcut: ConvSpec | None = None) -> tuple[int, int]:
    """Smallest circular grid N (input of conv1) on which Z1 = R C1 E and Z2 = R C2 E hold exactly."""
    grid = []
    for d in range(2):
        s = conv1.stride[d]
        if conv2.stride[d] != 1:
            raise ValueError("the circular LipLT bound needs the second conv to have stride 1")
        n = _min_grid(conv1.in_spatial[d], conv1.padding[d], s)
        m_need = conv1.out_spatial[d] + max(conv2.padding[d])
        n = max(n, m_need * s)
        if shortcut is not None:
            if shortcut.stride[d] != s:
                raise ValueError("shortcut and first conv must have the same stride")
            n = max(n, _min_grid(shortcut.in_spatial[d], shortcut.padding[d], s))
        grid.append(n)
    return tuple(grid)


def _max_sv(blocks: torch.Tensor) -> float:
    """max over the batch of sigma_max (an upper bound within 1e-9 relative of the exact value).

    The Gram matrices G of the blocks are formed once; batched power iteration finds the candidates, whose
    largest eigenvalues are computed exactly (eigvalsh); every block is then certified below
    t (1 + 1e-9) by a batched Cholesky factorisation of t (1 + 1e-9) I - G with Demmel's backward-error
    allowance (see lipschitz.sdp.verify_psd); blocks that fail are solved exactly. Several times faster than
    eigvalsh on every block for the large batches of the circular LipLT terms.
    """
    if blocks.numel() == 0:
        return 0.0
    gram = blocks.mH @ blocks if blocks.shape[-1] <= blocks.shape[-2] else blocks @ blocks.mH
    gram = gram.reshape(-1, gram.shape[-2], gram.shape[-1])
    if gram.shape[0] <= 4 or gram.shape[-1] <= 8:
        lam = torch.linalg.eigvalsh(gram)[..., -1]
        return math.sqrt(max(float(lam.max()), 0.0))
    return math.sqrt(max(_max_eig_certified(gram), 0.0))


def _max_eig_certified(gram: torch.Tensor, iters: int | None = None) -> float:
    """Certified max eigenvalue over a batch of Hermitian PSD matrices (see ``_max_sv``).

    Six single-precision power steps rank the blocks (a misranked block costs only a failed check and its
    eigvalsh). Blocks whose Cholesky check fails get their exact eigenvalue; only those are checked again at
    the raised level (a block proven below a level is below every higher one). Inside ``reference_path()``:
    12 float64 power steps and every block re-checked at each raised level, as before."""
    from lipschitz.dense import gamma

    n = gram.shape[-1]
    iters = iters if iters is not None else (12 if _REFERENCE else 6)
    # the power steps only pick the candidates: single precision is enough for that (half the memory traffic)
    g_pow = gram if _REFERENCE else gram.to(torch.complex64 if gram.is_complex() else torch.float32)
    v = torch.ones(gram.shape[0], n, 1, dtype=g_pow.dtype, device=gram.device)
    for _ in range(iters):
        v = g_pow @ v
        v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-30)
    ray = (v.mH @ g_pow @ v).real.flatten()
    cand = torch.argsort(ray, descending=True)[:2]
    exact = torch.linalg.eigvalsh(gram[cand])[..., -1]
    t = float(exact.max())
    todo = torch.arange(gram.shape[0], device=gram.device)
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    for _ in range(3):
        level = t * (1 + 1e-9) + 1e-300
        g = gram if len(todo) == gram.shape[0] else gram[todo]
        tr = level * n - torch.diagonal(g, dim1=-2, dim2=-1).real.sum(-1)
        # Demmel: a completed Cholesky of fl(level I - G - c I) proves level I - G >= 0 when c covers
        # gamma_{n+1}/(1 - gamma_{n+1}) tr(.) plus the rounding of the shift
        c = (2 * gamma(n + 1) * tr.abs() + 4 * 2.0**-53 * level) * 1.01
        info = torch.linalg.cholesky_ex((level - c)[:, None, None] * eye - g)[1]
        bad = torch.nonzero(info != 0).flatten()
        if len(bad) == 0:
            return level
        t = max(t, float(torch.linalg.eigvalsh(g[bad])[..., -1].max()))
        if not _REFERENCE:
            todo = todo[bad]
    return t * (1 + 1e-9)


def _spec_key(spec: ConvSpec, grid) -> tuple:
    """Identity of a circular conv on a grid (weights by value: a 128-bit BLAKE2b digest of the float64 bytes),
    for reusing its norm."""
    digest = hashlib.blake2b(spec.weight.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()
    return (tuple(grid), tuple(spec.weight.shape), spec.stride, spec.padding, spec.dilation, spec.padding_mode,
            digest)


def _term_key(conv1: ConvSpec, conv2: ConvSpec, a: float, shortcut, grid, grid2, circular: bool) -> tuple:
    """Identity of a whole circular LipLT computation (pieces compared by weight digest)."""
    sc = _spec_key(shortcut, grid) if isinstance(shortcut, ConvSpec) else shortcut
    return ("terms", _spec_key(conv1, grid), _spec_key(conv2, grid2), float(a), sc, circular)


def _half_spectrum(m1: int) -> torch.Tensor:
    """Frequencies u = 0 .. floor(m1 / 2) of the first axis. For real weights the symbol satisfies
    K(-u, -v) = conj(K(u, v)) (every phase factor is conjugated), and a matrix and its conjugate have the same
    singular values; every (u, v) with u > m1 / 2 is the conjugate of (m1 - u, -v mod m2), which is listed."""
    return torch.arange(m1 // 2 + 1)


def _representatives(u: torch.Tensor, m1: int, m2: int) -> torch.Tensor:
    """(len(u), m2) mask of the frequencies (u, v) to evaluate on rows ``u`` of ``_half_spectrum``: on a row
    that is its own conjugate (u = -u mod m1: u = 0, or m1 / 2) (u, v) and (u, -v) are conjugate, keep v <= -v."""
    v = torch.arange(m2)
    self_conj = (u % m1) == ((-u) % m1)
    return ~self_conj[:, None] | (v <= (-v) % m2)[None, :]


def circular_liplt_terms(conv1: ConvSpec, conv2: ConvSpec, a: float, shortcut: ConvSpec | str | None = None,
                         chunk_bytes: int = DEFAULT_CHUNK_BYTES, cache: dict | None = None) -> dict[str, Any]:
    """Circular norms on the LipLT grid: ``sum_norm`` = ||Bc + (a/2) C2 C1|| (a if circular padding),
    ``c1`` = ||C1||, ``c2`` = ||C2||, and the certified bound of ||B + a Z2 Z1|| they give.

    ``cache``: a dict reused across calls; ||C1|| and ||C2|| of identical convs on identical grids (the same
    conv pair with and without its shortcut) are computed once, and a whole result is reused when the same
    piece comes back (another method or node; weights compared by digest). Only the frequencies
    u <= m1 / 2 of the first axis are evaluated (conjugate symmetry, see ``_half_spectrum``); inside
    ``reference_path()`` every frequency, without reuse of whole results."""
    if conv1.c_out != conv2.c_in:
        raise ValueError(f"conv1 outputs {conv1.c_out} channels but conv2 takes {conv2.c_in}")
    circular = conv1.padding_mode == "circular" and conv2.padding_mode == "circular"
    for c in (conv1, conv2) + ((shortcut,) if isinstance(shortcut, ConvSpec) else ()):
        if c.padding_mode not in ("zeros",) and not circular:
            raise ValueError(f"padding_mode {c.padding_mode!r} is not supported by the circular LipLT bound")
    sc_spec = shortcut if isinstance(shortcut, ConvSpec) else None
    if circular and sc_spec is not None and sc_spec.padding_mode != "circular" and \
            any(p for pair in sc_spec.padding for p in pair):
        # a zero/reflect/replicate-padded shortcut is not its circular version on the n grid
        raise ValueError(f"a {sc_spec.padding_mode!r}-padded shortcut is not supported by the circular LipLT bound")
    if circular:
        for d in range(2):
            if conv1.out_spatial[d] * conv1.stride[d] != conv1.in_spatial[d] or \
                    conv2.out_spatial[d] != conv2.in_spatial[d]:
                raise ValueError("circular padding is supported only for size-preserving ('same') convs")
        grid = tuple(conv1.in_spatial)
        mix = a
    else:
        grid = liplt_grid(conv1, conv2, sc_spec)
        covered = all(grid[d] // conv1.stride[d] == conv1.out_spatial[d] for d in range(2))
        mix = a if covered else a / 2.0  # conv1's outputs fill the grid: the mask M is the identity
    if shortcut == "identity" and conv1.stride != (1, 1):
        raise ValueError("an identity shortcut needs stride 1")
    m1 = grid[0] // conv1.stride[0]
    grid2 = (grid[0] // conv1.stride[0], grid[1] // conv1.stride[1])
    per_row = 16 * grid2[1] * max(conv2.c_out * conv1.c_in * conv1.stride[0] * conv1.stride[1],
                                  conv1.c_out * conv1.c_in * conv1.stride[0] * conv1.stride[1],
                                  conv2.c_out * conv2.c_in) * 3
    rows = max(1, chunk_bytes // max(per_row, 1))
    no_mask = circular or mix == a
    real = not any(c.weight.is_complex() for c in (conv1, conv2, sc_spec) if c is not None)
    if _REFERENCE or not real:  # conjugate symmetry needs real weights
        freqs, need_c = torch.arange(m1), True
    else:
        freqs, need_c = _half_spectrum(m1), not no_mask  # ||C1||, ||C2|| enter the bound only with the mask
    sum_norm = c1 = c2 = 0.0
    term_key = None
    if cache is not None and not _REFERENCE:
        term_key = _term_key(conv1, conv2, a, shortcut, grid, grid2, circular)
        if term_key in cache.setdefault(_TERMS, {}):
            return dict(cache[_TERMS][term_key])
    keys = (_spec_key(conv1, grid), _spec_key(conv2, grid2)) if cache is not None and need_c else None
    known = not need_c or (keys is not None and keys[0] in cache and keys[1] in cache)
    if keys is not None and known:
        c1, c2 = cache[keys[0]], cache[keys[1]]
    for start in range(0, len(freqs), rows):
        u = freqs[start:start + rows]
        sel = slice(None) if _REFERENCE or not real else _representatives(u, m1, grid2[1])
        K1 = symbol(conv1, grid, u)[sel]
        K2 = symbol(conv2, grid2, u)[sel]
        if not known:
            c1, c2 = max(c1, _max_sv(K1)), max(c2, _max_sv(K2))
        T = mix * (K2 @ K1)
        if sc_spec is not None:
            T = T + symbol(sc_spec, grid, u)[sel]
        elif shortcut == "identity":
            T = T + torch.eye(T.shape[-1], dtype=T.dtype, device=T.device)
        sum_norm = max(sum_norm, _max_sv(T))
    if keys is not None and not known:
        cache[keys[0]], cache[keys[1]] = c1, c2
    bound = sum_norm if no_mask else sum_norm + abs(a) / 2.0 * c2 * c1
    out = {"grid": list(grid), "sum_norm": sum_norm, "c1": c1 if need_c else None, "c2": c2 if need_c else None,
           "bound": bound * (1.0 + ROUNDOFF_MARGIN), "circular_padding": circular, "mask": not no_mask}
    if term_key is not None:
        cache[_TERMS][term_key] = dict(out)
    return out


def _operator(spec: ConvSpec, in_shape: Sequence[int]):
    from spectral.operators import LayerOperator

    m = spec.module
    if isinstance(m, nn.Linear):
        return LayerOperator.linear(spec.raw_weight, tuple(in_shape))
    return LayerOperator.conv(spec.raw_weight, tuple(in_shape), stride=m.stride, padding=m.padding,
                              dilation=m.dilation, groups=m.groups, padding_mode=m.padding_mode)


def dense_norm(linear_map: Any, max_entries: int = 2**24) -> float:
    """Largest singular value of a linear map from its dense float64 matrix, via the eigenvalues of the
    smaller Gram matrix (several times faster than an SVD), times (1 + ROUNDOFF_MARGIN).

    The eigensolver's backward error is O(n eps ||A||^2), far below the 1e-9 relative margin for the
    sizes allowed here, so the returned value is an upper bound of the exact norm in practice.
    """
    from spectral.exact import operator_norm_dense

    value = operator_norm_dense(linear_map, max_entries, via="gram", dtype=torch.float64).value
    return value * (1.0 + ROUNDOFF_MARGIN)


def dense_linear_term(conv1: ConvSpec, conv2: ConvSpec, a: float, in_shape: Sequence[int],
                      shortcut: ConvSpec | str | None = None) -> float:
    """||B + a Z2 Z1|| from the dense float64 matrix of the composed operator (see ``dense_norm``)."""
    from spectral.operators import ChannelScale, SumMap, compose

    op1 = _operator(conv1, in_shape)
    op2 = _operator(conv2, op1.out_shape)
    dev = conv1.weight.device
    scaled = compose(op1, op2, ChannelScale(op2.out_shape, torch.full((op2.out_shape[0],), float(a),
                                                                      dtype=torch.float64, device=dev)))
    if shortcut is None:
        total = scaled
    elif shortcut == "identity":
        total = SumMap([scaled, ChannelScale(tuple(in_shape), torch.ones(in_shape[0], dtype=torch.float64,
                                                                           device=dev))])
    else:
        total = SumMap([scaled, _operator(shortcut, in_shape)])
    return dense_norm(total, max_entries=2**31)


def liplt_bound(conv1: ConvSpec, conv2: ConvSpec, split: tuple[float, float], upper1: float, upper2: float,
                in_shape: Sequence[int], shortcut: ConvSpec | str | None = None,
                dense_max_entries: int = 2**21, cache: dict | None = None) -> NormValue:
    """Certified ``||B + a A2 A1|| + b ||A2|| ||A1||`` for a piece B u + A2 sigma(A1 u + c), sigma = a z + b|z|.

    ``upper1``/``upper2``: certified upper bounds of ||A1||, ||A2|| (the zero-padded layers, folded).
    The linear term is exact by dense SVD when the operator has at most ``dense_max_entries`` entries,
    otherwise certified through the circular symbols (see module docstring).
    References: Fazlyab et al. 2023 (LipLT).
    """
    a, b = split
    t0 = time.perf_counter()
    n_in = math.prod(in_shape)
    n_out = conv2.c_out * math.prod(conv2.out_spatial)
    details: dict[str, Any] = {"a": a, "b": b, "upper1": upper1, "upper2": upper2,
                               "shortcut": shortcut if isinstance(shortcut, (str, type(None))) else "conv"}
    if n_in * n_out <= dense_max_entries:
        lin = dense_linear_term(conv1, conv2, a, in_shape, shortcut)
        details.update(linear_term=lin, linear_method="dense_gram_eigvalsh")
        guarantee = Guarantee.UPPER
    else:
        terms = circular_liplt_terms(conv1, conv2, a, shortcut, cache=cache)
        lin = terms["bound"]
        details.update(linear_term=lin, linear_method="circular_symbols", **terms)
        guarantee = Guarantee.UPPER
    value = lin + b * upper1 * upper2
    return NormValue(value, guarantee, "liplt", seconds=time.perf_counter() - t0, details=details)
