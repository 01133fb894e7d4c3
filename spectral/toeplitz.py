"""Boundary-aware certificates for zero-padded convolutions: block-banded Cholesky of ``mu I - H``.

A zero-padded convolution is a block-Toeplitz operator ``A``; its Gram matrix ``H = A^H A`` (or ``A A^H``,
the smaller side) is block-banded along any spatial axis, with ``(2k-1)``-wide band for a ``k``-tap kernel.
``||A||^2 <= mu`` iff ``mu I - H`` is positive semi-definite, which a block-banded Cholesky factorisation
certifies; the rigorous floating-point margin of ``spectral.roundoff`` (Cholesky backward error over the band
and the error of forming ``H``) is added to ``mu``. Two modes:

- ``"exact"`` (method ``banded_cholesky``): the true operator. The row axis is factored block by block; each
  block holds a whole row of the image (``n2 * C`` unknowns, axis 2 unrolled exactly). No embedding: the bound
  is ``||A|| (1 + rho)`` up to the margin, whatever the spatial size. Cost ``~ n1 (n2 C)^3``.
- ``"axis"`` (method ``axis_cholesky``): axis 2 is embedded into a (twisted) circulant, i.e. the layer is a
  submatrix of the operator that is zero-padded along axis 1 and ``theta``-quasi-periodic along axis 2, which
  the Fourier transform along axis 2 splits into one 1-d zero-padded operator ``A_v`` per frequency
  ``(v + theta) / M``; ``||A|| <= max_v ||A_v||``. Half the boundary is exact; cost ``~ M/2 n1 C^3``.

Both assemble the band blocks from the kernel: every tap pair's product ``W_a^T W_b`` is formed once (real),
then placed by the 0/1 incidence of the zero-padded axis and, along a Fourier axis, multiplied by the phase
``exp(-i omega (q_a - q_b))`` (polyphase strides as in ``spectral.circulant``). The target level comes from a
lower bound of the true norm (``target``) or, per block, from a batched Lanczos estimate.

References: Golub & Van Loan, "Matrix Computations" (block-banded Cholesky); Higham (2002), Thm 10.3;
Delattre, Barthelemy & Allauzen, "Spectral Norm of Convolutional Layers with Circular and Zero Paddings"
(2024) (zero padding vs circulant embeddings); Sedghi et al. (2019); Senderovich et al. (2022).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from spectral.geometry import polyphase, tap_phases
from spectral.guarantee import Guarantee, NormValue
from spectral.lower import batched_lanczos
from spectral.roundoff import cholesky_margin, gamma, unit_roundoff

__all__ = ["banded_certificate", "banded_plan", "BANDED_MODES", "Axis", "batched_lanczos"]

BANDED_MODES = {"exact": "banded_cholesky", "axis": "axis_cholesky"}


@dataclass(frozen=True)
class Axis:
    """One spatial axis of a zero-padded conv: input ``n``, output ``m``, ``k`` taps, stride, dilation, padding."""

    n: int
    m: int
    k: int
    s: int
    d: int
    p: int

    @property
    def offsets(self) -> list[int]:
        """Input index of tap ``a`` for output 0: ``d a - p`` (output ``o`` reads ``s o + d a - p``)."""
        return [self.d * a - self.p for a in range(self.k)]

    def incidence(self) -> torch.Tensor:
        """``S[a, o, i] = 1`` iff output ``o`` reads input ``i`` through tap ``a`` (zero padding), ``(k, m, n)``."""
        S = torch.zeros(self.k, self.m, self.n, dtype=torch.float64)
        for a, t in enumerate(self.offsets):
            for o in range(self.m):
                i = self.s * o + t
                if 0 <= i < self.n:
                    S[a, o, i] = 1.0
        return S


def _axes(op: Any, axis: int) -> tuple[Axis, Axis, torch.Tensor]:
    """The exact (row) axis, the other axis and the 4-d kernel with the row axis first (conv1d: a dummy axis)."""
    w = op.weight.detach()
    if op.kind == "conv1d":
        w = w.unsqueeze(-1)
        a1 = Axis(op.in_shape[1], op.out_shape[1], w.shape[2], op.stride[0], op.dilation[0], op.padding[0][0])
        return a1, Axis(1, 1, 1, 1, 1, 0), w
    dims = [0, 1] if axis == 0 else [1, 0]
    ax = [Axis(op.in_shape[1 + i], op.out_shape[1 + i], w.shape[2 + i], op.stride[i], op.dilation[i],
               op.padding[i][0]) for i in dims]
    return ax[0], ax[1], (w if axis == 0 else w.transpose(2, 3))


def _fourier_axis(ax: Axis, pad_after: int, twist: float) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coarse grid ``M``, representative frequencies ``v`` (one per conjugate pair; ``omega = 2 pi v / M``,
    ``v`` fractional on a twisted grid) and per-tap coarse shift
    ``q`` / input phase ``r`` of a (twisted) circulant embedding of a zero-padded axis."""
    from spectral.upper import zero_padding_grid

    N = zero_padding_grid(ax.n, ax.k, ax.s, ax.d, ax.p, pad_after)
    M = N // ax.s
    v = torch.arange(M, dtype=torch.float64) + twist
    v = v[v <= M / 2 + 1e-12]  # omega and -omega give conjugate operators (real kernels): same norm
    q, r = polyphase(torch.tensor(ax.offsets), ax.s)
    return M, v, q, r


@dataclass
class _Problem:
    """The batched block-banded Gram ``H`` of ``A_b`` (b = group x frequency): tap matrices and band data."""

    taps: torch.Tensor       # (B, k1, p, q): A_b maps (n1, q) -> (m1, p) via y[o] = sum_a taps[a] x[s o + t_a]
    gamma_src: Any           # () -> (B, k1, k1, r, r): inner Gram of each tap pair on the factored side (lazy)
    pairs: torch.Tensor      # (k1, k1, R, R): 0/1 incidence of the pair on the band (rows of H)
    side: str
    rows: int
    band: int
    row_axis: Axis
    labels: list[dict]
    row_pad_after: int = 0
    scout_steps: int = 0
    taps_t: torch.Tensor | None = None  # the taps side by side, cached for _apply
    taps_h: torch.Tensor | None = None
    _gamma: torch.Tensor | None = None

    @property
    def gamma_pairs(self) -> torch.Tensor:
        if self._gamma is None:
            self._gamma = self.gamma_src()
        return self._gamma

    @property
    def block(self) -> int:
        p, q = self.taps.shape[-2:]
        return q if self.side == "in" else p

    def block_at(self, r: int, j: int) -> torch.Tensor:
        """``H(r, j)`` for ``j <= r`` (lower band), (B, block, block): the sum of the tap pairs that meet there."""
        out = None
        for a, b in self.pairs[:, :, r, j].nonzero().tolist():
            term = self.gamma_pairs[:, a, b] * float(self.pairs[a, b, r, j])
            out = term if out is None else out.add_(term)
        if out is None:
            return torch.zeros(self.gamma_pairs.shape[0], self.block, self.block, dtype=self.gamma_pairs.dtype)
        return out


def _tap_products(w: torch.Tensor, groups: int, side: str) -> torch.Tensor:
    """``g[G, a, b] = W_a^T W_b`` (side "in") or ``W_a W_b^T`` (side "out") in float64, (G, K, K, c, c)."""
    c_out = w.shape[0] // groups
    taps = w.to(torch.float64).reshape(groups, c_out, w.shape[1], -1).permute(0, 3, 1, 2)  # (G, K, o, i)
    if side == "in":
        taps = taps.transpose(-1, -2)  # W_a^T W_b = (W_a^T)(W_a^T)^T: the same products of the transposes
    K, c = taps.shape[1], taps.shape[2]
    out = torch.empty(groups, K, K, c, c, dtype=torch.float64)
    for a in range(K):  # each unordered pair once: the pair (b, a) is the transpose
        prod = torch.matmul(taps[:, a:a + 1], taps[:, a:].transpose(-1, -2))  # (G, K - a, c, c)
        out[:, a, a:] = prod
        out[:, a + 1:, a] = prod[:, 1:].transpose(-1, -2)
    return out


def _build(op: Any, mode: str, axis: int, twist: float, side: str | None = None,
           products: dict[str, torch.Tensor] | None = None) -> _Problem:
    """The banded problem of ``op`` with spatial axis ``axis`` exact (rows); ``products`` caches the tap-pair
    products of the *original* kernel per side (shared by the candidates of ``banded_certificate``)."""
    if op.kind == "conv1d":
        mode, axis = "exact", 0  # one spatial axis: nothing to embed
    a1, a2, w = _axes(op, axis)
    groups = op.groups
    G, c_out, c_in = groups, w.shape[0] // groups, w.shape[1]
    k1, k2 = w.shape[2], w.shape[3]
    cdt = torch.float64 if mode == "exact" else torch.complex128
    if mode == "exact":
        S2 = a2.incidence()  # (k2, m2, n2)
        inner_out, inner_in = a2.m * c_out, a2.n * c_in
        labels = [{"group": g} for g in range(G)]
    else:
        pad_after = op.padding[1 if axis == 0 else 0][1]
        M, v, q, r = _fourier_axis(a2, pad_after, twist)
        s2 = a2.s
        # F2[f, a2] : (1 x s2) row  exp(-i omega q_a) e_{r_a}^T
        S2 = tap_phases(v, q, r, s2, M).unsqueeze(2)
        inner_out, inner_in = c_out, s2 * c_in
        labels = [{"group": g, "frequency": float(f), "coarse_grid": M} for g in range(G) for f in v]
    rows_in, rows_out = a1.n, a1.m
    band_in, band_out = a1.d * (k1 - 1), (a1.d * (k1 - 1)) // a1.s
    if side is None:
        cost = {s: n * _row_flops(b) * blk ** 3 for s, n, b, blk in
                (("in", rows_in, band_in, inner_in), ("out", rows_out, band_out, inner_out))}
        side = min(cost, key=cost.get)
    S1 = a1.incidence()  # (k1, m1, n1)
    pairs = (torch.einsum("aoi,boj->abij", S1, S1) if side == "in" else torch.einsum("aoi,bpi->abop", S1, S1))
    products = {} if products is None else products
    c_side = c_in if side == "in" else c_out
    kh, kw = (k1, k2) if axis == 0 else (k2, k1)

    def tap_products() -> torch.Tensor:
        if side not in products:
            w0 = op.weight.detach() if op.kind == "conv2d" else op.weight.detach()[..., None]
            products[side] = _tap_products(w0, groups, side)
        g0 = products[side].reshape(G, kh, kw, kh, kw, c_side, c_side)
        return g0.permute(0, 2, 1, 4, 3, 5, 6) if axis == 1 else g0  # transposed kernel: swap the tap indices
    # inner pair structure along axis 2: in: S2[a]^H S2[b], out: S2[a] S2[b]^H
    if mode == "exact":
        P2 = (torch.einsum("aoi,boj->abij", S2, S2) if side == "in" else torch.einsum("aoi,bpi->abop", S2, S2))

        def gam() -> torch.Tensor:
            g = tap_products()
            out = torch.einsum("uvxy,gaubvij->gabxiyj", P2, g)
            return out.reshape(G, k1, k1, P2.shape[-2] * g.shape[-2], P2.shape[-1] * g.shape[-1])
        X = torch.einsum("zoi,gpqaz->gaopiq", S2, w.to(torch.float64).reshape(G, c_out, c_in, k1, k2))
        X = X.reshape(G, k1, a2.m * c_out, a2.n * c_in)  # rows (o2, c_out), columns (i2, c_in)
    else:
        F = S2.shape[0]
        P2 = (torch.einsum("faoi,fboj->fabij", S2.conj(), S2) if side == "in"
              else torch.einsum("faoi,fbpi->fabop", S2, S2.conj()))

        def gam() -> torch.Tensor:
            return _phase_combine(P2, tap_products())
        wg = w.to(torch.float64).reshape(G, c_out, c_in, k1, k2).to(cdt)
        X = torch.einsum("fbzr,gpqab->gfapzrq", S2, wg)  # (G, F, k1, c_out, 1, s2, c_in)
        X = X.reshape(G * F, k1, c_out, s2 * c_in)
    rows, band = (rows_in, band_in) if side == "in" else (rows_out, band_out)
    pad_after = op.padding[axis][1] if op.kind == "conv2d" else op.padding[0][1]
    return _Problem(X, gam, pairs, side, rows, band, a1, labels, pad_after)


def _phase_combine(P2: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``gam[(G,f), a, b] = sum_{u,v} kron(P2[f, u, v], g[G, a, u, b, v])`` with real ``g`` and complex ``P2``
    (each ``P2[f, u, v]`` has one nonzero entry): two real matrix products per placement, no complex copy of g."""
    F, k2, _, X, Y = P2.shape
    G, k1, _, _, _, c, c2 = g.shape
    gm = g.permute(0, 1, 3, 2, 4, 5, 6).reshape(G * k1 * k1, k2 * k2, c * c2)
    out = torch.zeros(G, F, k1, k1, X, c, Y, c2, dtype=P2.dtype)
    for x in range(X):
        for y in range(Y):
            coef = P2[:, :, :, x, y].reshape(F, k2 * k2)
            if not bool(coef.abs().gt(0).any()):
                continue
            re = torch.matmul(coef.real.contiguous(), gm)  # (G k1 k1, F, c c2)
            im = torch.matmul(coef.imag.contiguous(), gm)
            blk = torch.complex(re, im).reshape(G, k1, k1, F, c, c2).permute(0, 3, 1, 2, 4, 5)
            out[:, :, :, :, x, :, y, :] = blk
    return out.reshape(G * F, k1, k1, X * c, Y * c2)


def _row_flops(band: int) -> float:
    """Per block row of a banded Cholesky, in units of ``block^3`` real flops."""
    return 1.0 / 3.0 + band + band * (band + 1)


def _apply(prob: _Problem, x: torch.Tensor) -> torch.Tensor:
    """``H x`` for a batch ``x`` of shape (B, rows * block) via the tap matrices (A^H A or A A^H): one product
    with all taps side by side per direction (the taps are read once), then the shifted sums."""
    ax, X = prob.row_axis, prob.taps
    B, k1, p, q = X.shape
    if prob.taps_t is None:
        prob.taps_t = X.permute(0, 3, 1, 2).reshape(B, q, k1 * p).contiguous()         # v @ taps_t: all W_a v
        prob.taps_h = X.conj().permute(0, 2, 1, 3).reshape(B, p, k1 * q).contiguous()  # u @ taps_h: all W_a^H u
    hits = []
    for t in ax.offsets:
        o = torch.arange(ax.m)
        i = ax.s * o + t
        ok = (i >= 0) & (i < ax.n)
        hits.append((o[ok], i[ok]))

    def fwd(v: torch.Tensor) -> torch.Tensor:  # (B, n1, q) -> (B, m1, p)
        Y = torch.matmul(v, prob.taps_t).reshape(B, ax.n, k1, p)
        out = torch.zeros(B, ax.m, p, dtype=X.dtype)
        for a, (o, i) in enumerate(hits):
            out[:, o] += Y[:, i, a]
        return out

    def adj(u: torch.Tensor) -> torch.Tensor:  # (B, m1, p) -> (B, n1, q)
        Z = torch.matmul(u, prob.taps_h).reshape(B, ax.m, k1, q)
        out = torch.zeros(B, ax.n, q, dtype=X.dtype)
        for a, (o, i) in enumerate(hits):
            out[:, i] += Z[:, o, a]
        return out

    if prob.side == "in":
        return adj(fwd(x.reshape(B, ax.n, q))).reshape(B, -1)
    return fwd(adj(x.reshape(B, ax.m, p))).reshape(B, -1)


def _factor(prob: _Problem, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-banded Cholesky of ``mu_b I - H_b`` for every batch element: (success flags, trace of mu I - H)."""
    B, R, b, n = prob.gamma_pairs.shape[0], prob.rows, prob.band, prob.block
    dt = prob.gamma_pairs.dtype
    eye = torch.eye(n, dtype=dt)
    ok = torch.ones(B, dtype=torch.bool)
    trace = torch.zeros(B, dtype=torch.float64)
    L: dict[tuple[int, int], torch.Tensor] = {}
    for r in range(R):
        for j in range(max(0, r - b), r):
            X = -prob.block_at(r, j)
            for l_ in range(max(0, r - b), j):
                if (j, l_) in L:
                    X = X - L[(r, l_)] @ L[(j, l_)].mH
            # L(r, j) = X L(j, j)^{-H}
            L[(r, j)] = torch.linalg.solve_triangular(L[(j, j)], X.mH, upper=False).mH
        D = mu.to(dt)[:, None, None] * eye - prob.block_at(r, r)
        trace += torch.diagonal(D, dim1=-2, dim2=-1).real.sum(-1).to(torch.float64)
        for l_ in range(max(0, r - b), r):
            D = D - L[(r, l_)] @ L[(r, l_)].mH
        Lrr, info = torch.linalg.cholesky_ex(D)
        bad = info != 0
        ok &= ~bad
        # a failed element keeps going on an identity pivot so the others are not poisoned by NaN
        L[(r, r)] = torch.where(bad[:, None, None], eye.expand_as(Lrr), Lrr)
        for key in [k for k in L if k[0] <= r - b - 1]:
            del L[key]
    return ok, trace


def banded_plan(op: Any, mode: str = "exact", axis: int = 0) -> dict[str, Any]:
    """Up-front cost (flops, peak bytes) of ``banded_certificate`` without building anything."""
    if mode not in BANDED_MODES:
        raise ValueError(f"unknown banded mode {mode!r}; valid: {', '.join(BANDED_MODES)}")
    a1, a2, w = _axes(op, axis)
    G, c_out, c_in = op.groups, w.shape[0] // op.groups, w.shape[1]
    k1, k2 = w.shape[2], w.shape[3]
    if mode == "exact":
        inner_out, inner_in, F, cplx = a2.m * c_out, a2.n * c_in, 1, 1
    else:
        from spectral.upper import zero_padding_grid

        N = zero_padding_grid(a2.n, a2.k, a2.s, a2.d, a2.p, op.padding[1 if axis == 0 else 0][1])
        M = N // a2.s
        F = M // 2 + 1
        inner_out, inner_in, cplx = c_out, a2.s * c_in, 4
    band_in, band_out = a1.d * (k1 - 1), (a1.d * (k1 - 1)) // a1.s
    options = {"in": (a1.n, band_in, inner_in), "out": (a1.m, band_out, inner_out)}
    side = min(options, key=lambda s_: options[s_][0] * _row_flops(options[s_][1]) * options[s_][2] ** 3)
    rows, band, blk = options[side]
    c_side = c_in if side == "in" else c_out
    batch = G * F
    factor_flops = batch * rows * _row_flops(band) * blk ** 3 * cplx
    # Lanczos estimates (scouting 4 embeddings in axis mode, then 40 steps): 2 tap passes per step
    steps = 40 + (4 * 10 if mode == "axis" else 0)
    lanczos_flops = steps * 2 * 2 * max(a1.n, a1.m) * k1 * inner_out * inner_in * batch * cplx
    assemble_flops = 2 * G * (k1 * k2) ** 2 * c_side ** 2 * (c_out + c_in) / 2 + batch * k1 ** 2 * blk ** 2 * 8
    bytes_per = 8 * (2 if cplx > 1 else 1)
    peak = bytes_per * batch * blk ** 2 * (k1 ** 2 + (band + 1) ** 2 + 3) + 8 * G * (k1 * k2) ** 2 * c_side ** 2
    return {"mode": mode, "method": BANDED_MODES[mode], "side": side, "rows": rows, "band": band, "block": blk,
            "batch": batch, "flops": float(factor_flops + assemble_flops + lanczos_flops), "bytes": int(peak), "axis": axis}


def banded_certificate(
    op: Any,
    *,
    mode: str = "exact",
    target: float | None = None,
    rho: float = 0.0025,
    axis: int | None = None,
    twist: float | None = None,
    accept: float | None = None,
    lanczos_steps: int = 40,
    max_tries: int = 60,
    seed: int = 0,
) -> NormValue:
    """Certified upper bound on ``||op||`` for a zero-padded conv1d/conv2d ``LayerOperator`` (any stride,
    dilation, groups) by block-banded Cholesky of ``mu I - H``, in float64 with a rigorous round-off margin.

    ``mode="exact"``: ``H`` of the true operator (``banded_cholesky``); ``mode="axis"``: axis ``1 - axis`` is
    embedded into a ``twist``-quasi-periodic circulant (``axis_cholesky``; with ``axis``/``twist`` None the
    best of the 2 axes x {0, 1/2} twists by Lanczos estimate). Every block is certified at
    ``mu_b = max(target, theta_b)^2 (1 + rho)^2`` (``theta_b``: Lanczos estimate) and, where that fails, at
    levels growing by ``(1 + rho)^2``. With ``accept`` (a norm the caller is content with), an ``axis`` element
    whose circulant column certifies ``||A_b|| <= accept`` skips its banded factorisation (one small Cholesky per
    circulant block instead), one whose estimate leaves room is factorised once at ``accept``. ``details``: the
    estimate ``block_lower`` (max ``sqrt(theta_b)``, from below on the *embedding's* norm), failures, margins.
    References: Golub & Van Loan (banded Cholesky); Higham (2002) Thm 10.3; Delattre et al. (2024).
    """
    if mode not in BANDED_MODES:
        raise ValueError(f"unknown banded mode {mode!r}; valid: {', '.join(BANDED_MODES)}")
    if getattr(op, "kind", None) not in ("conv1d", "conv2d") or op.padding_mode != "zeros":
        raise ValueError("banded certificates take a zero-padded conv LayerOperator (copy padding: certify the "
                         "valid convolution and multiply by the padding map's norm)")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    t0 = time.perf_counter()
    if mode == "axis" and op.kind == "conv1d":
        mode = "exact"  # one spatial axis: nothing to embed
    prob, theta, (axis_used, twist_used) = _choose_embedding(op, mode, axis, twist, lanczos_steps, seed)
    form = _formation_error(op, prob)
    certified = torch.zeros(theta.shape[0], dtype=torch.bool)
    bound = torch.zeros(theta.shape[0], dtype=torch.float64)
    by_columns = 0
    if mode == "axis" and accept is not None and accept > 0:
        hopeful = (theta * (1 + rho) ** 2 < accept ** 2).nonzero().flatten()
        if hopeful.numel():
            passed, col_bound = _circulant_columns(_subset(prob, hopeful), accept ** 2 * (1 - 1e-6), form)
            certified[hopeful[passed]] = True
            bound[hopeful[passed]] = col_bound[passed]
            by_columns = int(passed.sum())
    tries, factorisations = 0, 0
    if mode == "axis" and accept is not None and accept > 0:
        # the caller is content with ``accept``: an element whose estimate leaves room is certified there
        # directly (no refined estimate needed); a failure falls back to the tight levels below
        easy = ((~certified) & (theta * (1 + rho) ** 2 < accept ** 2)).nonzero().flatten()
        if easy.numel():
            level = torch.full((easy.numel(),), accept ** 2 * (1 - 1e-6), dtype=torch.float64)
            ok, easy_bound, factorisations = _certify_once(_subset(prob, easy), level, form)
            certified[easy[ok]] = True
            bound[easy[ok]] = easy_bound[ok]
            tries = 1
    todo = (~certified).nonzero().flatten()
    if todo.numel():
        sub = prob if todo.numel() == theta.shape[0] else _subset(prob, todo)
        if lanczos_steps > prob.scout_steps:  # refine the estimates of the elements that need a factorisation
            more = batched_lanczos(lambda x: _apply(sub, x), sub.rows * sub.block, len(sub.labels), sub.taps.dtype,
                                   steps=lanczos_steps, seed=seed + 1)
            theta[todo] = torch.maximum(theta[todo], more)
        level = max(target or 0.0, 0.0) ** 2
        mu = torch.clamp(theta[todo], min=level) * (1 + rho) ** 2
        mu = torch.where(mu > 0, mu, torch.full_like(mu, max(form, 1e-300)))
        bound[todo], more_tries, more_factorisations = _certify_levels(sub, mu, rho, form, max_tries)
        tries, factorisations = tries + more_tries, factorisations + more_factorisations
    value = math.sqrt(float(bound.max()))
    worst = int(torch.argmax(bound))
    return NormValue(value, Guarantee.UPPER, BANDED_MODES[mode], factorisations, time.perf_counter() - t0, {
        "mode": mode, "side": prob.side, "rows": prob.rows, "band": prob.band, "block": prob.block,
        "batch": int(prob.taps.shape[0]), "exact_axis": axis_used, "twist": twist_used if mode == "axis" else None,
        "rho": rho, "target": target, "block_lower": math.sqrt(float(theta.max())), "tries": tries,
        "argmax": prob.labels[worst], "formation_margin": form, "accept": accept,
        "certified_by_circulant_column": by_columns,
    })


def _choose_embedding(op: Any, mode: str, axis: int | None, twist: float | None, steps: int,
                      seed: int) -> tuple[_Problem, torch.Tensor, tuple[int, float]]:
    """The problem to certify: for ``axis`` mode the axis/twist whose Lanczos estimate of ``max_b ||A_b||`` is
    smallest (short scouting runs on the tap operators; nothing is factorised here)."""
    candidates = [(axis if axis is not None else 0, twist if twist is not None else 0.0)]
    if mode == "axis" and (axis is None or twist is None):
        candidates = [(a, t) for a in ((0, 1) if axis is None else (axis,))
                      for t in ((0.0, 0.5) if twist is None else (twist,))]
    scout = steps if len(candidates) == 1 else max(3, steps // 12)
    products: dict[str, torch.Tensor] = {}
    best: tuple[float, _Problem, torch.Tensor, tuple] | None = None
    for cand in candidates:
        prob = _build(op, mode, cand[0], cand[1], products=products)
        prob.scout_steps = scout
        theta = batched_lanczos(lambda x: _apply(prob, x), prob.rows * prob.block, prob.taps.shape[0],
                                prob.taps.dtype, steps=scout, seed=seed)
        if best is None or float(theta.max()) < best[0]:
            best = (float(theta.max()), prob, theta, cand)
    assert best is not None
    return best[1], best[2], best[3]


def _certify_once(prob: _Problem, mu: torch.Tensor, form: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One banded Cholesky of ``mu_b I - H_b`` per element: (success flags, certified squared bounds, count)."""
    ok, trace = _factor(prob, mu)
    margin = cholesky_margin(trace, (prob.band + 1) * prob.block, torch.float64) + form
    return ok, mu * (1 + 4 * unit_roundoff(torch.float64)) + margin, int(mu.numel())


def _certify_levels(prob: _Problem, mu: torch.Tensor, rho: float, form: float,
                    max_tries: int) -> tuple[torch.Tensor, int, int]:
    """Banded Cholesky of ``mu_b I - H_b``; failures retry at ``mu_b (1 + rho)^2``. Returns the certified
    squared bounds (level plus rigorous margin), the number of rounds and of factorisations."""
    certified = torch.zeros_like(mu, dtype=torch.bool)
    bound = torch.zeros_like(mu)
    tries, factorisations = 0, 0
    while not bool(certified.all()):
        tries += 1
        if tries > max_tries:
            raise RuntimeError("banded Cholesky certificate did not succeed; the weights may contain NaN/Inf")
        todo = (~certified).nonzero().flatten()
        sub = prob if todo.numel() == len(prob.labels) else _subset(prob, todo)
        ok, level_bound, count = _certify_once(sub, mu[todo], form)
        factorisations += count
        bound[todo[ok]] = level_bound[ok]
        certified[todo[ok]] = True
        mu[todo[~ok]] *= (1 + rho * 2.0 ** min(tries - 1, 20)) ** 2  # geometric steps: few retries for tiny rho
    return bound, tries, factorisations


def _subset(prob: _Problem, idx: torch.Tensor) -> _Problem:
    if idx.numel() == prob.taps.shape[0] and bool((idx == torch.arange(idx.numel())).all()):
        return prob
    sub_gamma = prob.gamma_pairs[idx]
    return _Problem(prob.taps[idx], lambda: sub_gamma, prob.pairs, prob.side, prob.rows, prob.band,
                    prob.row_axis, [prob.labels[int(i)] for i in idx], prob.row_pad_after)


def _circulant_columns(prob: _Problem, level: float, form: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Certify ``||A_b||^2 <= level`` through the circulant embedding of the *row* axis too: ``A_b`` is a
    submatrix of the circulant whose blocks are ``B_b(u) = sum_a exp(-i omega_u q_a) X_a E_{r_a}`` (the 2-d
    circulant blocks of one column of frequencies), so one small Cholesky per block replaces the banded
    factorisation where the circulant column is already good enough. ``B^H B`` (side "in") or ``B B^H`` (side
    "out") is assembled from the tap-pair Grams. Returns (passed, bound) per element."""
    from spectral.upper import zero_padding_grid

    ax, gam = prob.row_axis, prob.gamma_pairs
    B, k1, _, n_blk, _ = gam.shape
    N = zero_padding_grid(ax.n, ax.k, ax.s, ax.d, ax.p, prob.row_pad_after)
    M = N // ax.s
    q1, r1 = polyphase(torch.tensor(ax.offsets), ax.s)
    omega = 2 * math.pi * torch.arange(M, dtype=torch.float64) / M
    phases = ax.s if prob.side == "in" else 1
    sign = 1.0 if prob.side == "in" else -1.0
    # group the tap pairs by (coarse offset, phase block): H(u) = sum_key exp(i sign omega delta) G_key
    groups: dict[tuple[int, int, int], torch.Tensor] = {}
    for a in range(k1):
        for b in range(k1):
            ra, rb = int(r1[a]), int(r1[b])
            if prob.side == "out" and ra != rb:
                continue
            key = (int(q1[a] - q1[b]), ra if prob.side == "in" else 0, rb if prob.side == "in" else 0)
            groups[key] = gam[:, a, b] if key not in groups else groups[key] + gam[:, a, b]
    H = torch.zeros(B, M, phases * n_blk, phases * n_blk, dtype=torch.complex128)
    for (ra, rb) in {(k[1], k[2]) for k in groups}:
        keys = [k for k in groups if (k[1], k[2]) == (ra, rb)]
        delta = torch.tensor([k[0] for k in keys], dtype=torch.float64)
        ph = torch.polar(torch.ones(M, len(keys), dtype=torch.float64), sign * omega[:, None] * delta[None])
        stack = torch.stack([groups[k] for k in keys], 1).to(torch.complex128).reshape(B, len(keys), -1)
        blk = torch.matmul(ph.to(torch.complex128), stack).reshape(B, M, n_blk, n_blk)
        H[:, :, ra * n_blk:(ra + 1) * n_blk, rb * n_blk:(rb + 1) * n_blk] = blk
    S = H.neg_()
    S.diagonal(dim1=-2, dim2=-1).add_(level)
    _, info = torch.linalg.cholesky_ex(S)
    trace = torch.diagonal(S, dim1=-2, dim2=-1).real.sum(-1).to(torch.float64)
    margin = cholesky_margin(trace, S.shape[-1], torch.float64).amax(1) + 2 * form
    passed = (info == 0).all(dim=1)
    return passed, level * (1 + 4 * unit_roundoff(torch.float64)) + margin


def _formation_error(op: Any, prob: _Problem) -> float:
    """Bound on ``||H_computed - H||_2``: tap products (inner length ``C``), sums over tap pairs and phases."""
    w = op.weight.detach().to(torch.float64)
    K = math.prod(w.shape[2:])
    c = max(w.shape[0] // op.groups, w.shape[1])
    u = unit_roundoff(torch.float64)
    phase = (4 * math.pi * (max(prob.row_axis.n, 1) + K) + 8) * u
    taps = w.reshape(op.groups, w.shape[0] // op.groups, w.shape[1], -1)
    abs_sum = float(torch.linalg.vector_norm(taps, dim=(1, 2)).sum(-1).max())
    return (gamma(4 * (c + 2 * K * K + 8), u) + 2 * phase) * abs_sum ** 2
