"""The circulant (Fourier) certificate: per-frequency Cholesky of ``mu I - H(u)`` for a circular convolution.

A circular convolution on a grid is block-diagonalised by the DFT (polyphase for strides); each frequency
block ``B(u)`` gives a Hermitian ``H(u) = B B^H`` (or ``B^H B``, the smaller side), assembled cheaply from the
kernel's tap autocorrelations; ``||B(u)||^2 <= mu`` iff ``mu I - H(u)`` is positive semi-definite, which a
Cholesky factorisation certifies at ``r^3/3`` per block. A rigorous floating-point margin (Cholesky backward
error plus the error of forming ``H``, ``spectral.roundoff``) is added. Zero padding and copy padding reach
this certificate through an embedding (``spectral.upper.embedding``, ``spectral.sandwich``).

References: Sedghi, Gupta & Long (2019) (FFT block-diagonalisation); Senderovich et al. (2022) (polyphase
strides); Higham, "Accuracy and Stability of Numerical Algorithms", Thm 10.3 (Cholesky backward error).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch

from spectral.geometry import polyphase, tap_offsets
from spectral.guarantee import Guarantee, NormValue
from spectral.lower import batched_lanczos
from spectral.roundoff import gamma, unit_roundoff

__all__ = ["ESTIMATORS", "fourier_certificate", "plane_wave", "power_top", "top_estimate"]


def _tap_table(
    kernel: Sequence[int], grid: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tap (kernel row-major): coarse position ``q`` (K, nd) and flattened input phase ``r`` (K,)."""
    axes_q, axes_r = [], []
    for k, m, s, d in zip(kernel, grid, stride, dilation):
        q, r = polyphase(tap_offsets(k, d, modulus=m), s)
        axes_q.append(q)
        axes_r.append(r)
    mesh_q = torch.meshgrid(*axes_q, indexing="ij")
    mesh_r = torch.meshgrid(*axes_r, indexing="ij")
    q = torch.stack([g.reshape(-1) for g in mesh_q], dim=1)
    r = torch.zeros(q.shape[0], dtype=torch.long)
    for axis, s in zip(mesh_r, stride):
        r = r * s + axis.reshape(-1)
    return q, r


class _FourierGram:
    """``H(u) = B(u) B(u)^H`` (side "out") or ``B(u)^H B(u)`` (side "in") of a circular convolution,
    assembled as ``sum_delta G_delta exp(-+2 pi i <u, delta / M>)`` from the kernel's tap autocorrelations.

    ``B(u) = sum_a W_a exp(-2 pi i <u, q_a> / M) E_{r_a}`` is the frequency block of the polyphase form
    (``M = grid / stride``). Forming the real matrices ``G_delta`` costs ``K^2/2`` small real products once;
    each frequency then costs ``D r^2`` instead of an ``r^2 c`` complex product.
    """

    def __init__(self, weight: torch.Tensor, grid: Sequence[int], stride: Sequence[int],
                 dilation: Sequence[int], groups: int, dtype: torch.dtype) -> None:
        w = weight.detach().to(dtype)
        nd = w.dim() - 2
        self.nd, self.groups, self.dtype = nd, groups, dtype
        self.grid, self.stride = tuple(grid), tuple(stride)
        self.coarse = tuple(g // s for g, s in zip(grid, stride))
        c_out, c_in_g = w.shape[0] // groups, w.shape[1]
        kernel = tuple(w.shape[2:])
        n_phase = math.prod(stride)
        self.c_out, self.c_in_g, self.n_phase = c_out, c_in_g, n_phase
        self.side = "out" if c_out <= c_in_g * n_phase else "in"
        self.size = c_out if self.side == "out" else c_in_g * n_phase
        q, r = _tap_table(kernel, grid, stride, dilation)
        self.q, self.r = q, r
        taps = w.reshape(groups, c_out, c_in_g, -1).permute(0, 3, 1, 2).contiguous()  # (g, K, co, ci)
        self.taps = taps
        K = taps.shape[1]
        # tap-pair products, each computed once: W_a W_b^T (side "out") or W_a^T W_b (side "in");
        # the pair (b, a) contributes the transpose at the opposite offset
        deltas: dict[tuple[int, ...], int] = {}
        for a in range(K):
            for b in range(K):
                if self.side == "out" and r[a] != r[b]:
                    continue
                deltas.setdefault(tuple(int(x) for x in (q[a] - q[b])), len(deltas))
        D = len(deltas)
        ci = c_in_g
        G = torch.zeros(D, groups, self.size, self.size, dtype=dtype)
        for a in range(K):
            for b in range(a, K):
                if self.side == "out" and r[a] != r[b]:
                    continue
                d_ab = deltas[tuple(int(x) for x in (q[a] - q[b]))]
                d_ba = deltas[tuple(int(x) for x in (q[b] - q[a]))]
                if self.side == "out":
                    prod = taps[:, a] @ taps[:, b].mT
                    G[d_ab].add_(prod)
                    if b != a:
                        G[d_ba].add_(prod.mT)
                else:
                    prod = taps[:, a].mT @ taps[:, b]
                    ra, rb = int(r[a]), int(r[b])
                    G[d_ab, :, ra * ci:(ra + 1) * ci, rb * ci:(rb + 1) * ci].add_(prod)
                    if b != a:
                        G[d_ba, :, rb * ci:(rb + 1) * ci, ra * ci:(ra + 1) * ci].add_(prod.mT)
        self.deltas = torch.tensor(list(deltas.keys()), dtype=torch.float64).reshape(len(deltas), nd)
        self.G = G  # (D, g, n, n)
        self.complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        self.neg_flat = (-G).reshape(D, -1).to(self.complex_dtype)
        self.sign = -1.0 if self.side == "out" else 1.0
        self.taps_count = K
        self.frobenius2 = float(w.double().square().sum())
        # frequencies: full grid on all but the last coarse axis, one-sided on the last (real kernels)
        axes = [torch.arange(M) for M in self.coarse[:-1]] + [torch.arange(self.coarse[-1] // 2 + 1)]
        mesh = torch.meshgrid(*axes, indexing="ij")
        self.freqs = torch.stack([m.reshape(-1) for m in mesh], dim=1)  # (F, nd)
        if D == 1:  # only the zero offset (e.g. a 1x1 kernel, any stride): H(u) is the same at every u
            self.freqs = self.freqs[:1]

    @property
    def n_blocks(self) -> int:
        return self.freqs.shape[0] * self.groups

    def _phases(self, freq_index: torch.Tensor) -> torch.Tensor:
        u = self.freqs[freq_index].to(torch.float64)
        scaled = self.deltas / torch.tensor(self.coarse, dtype=torch.float64)
        angle = self.sign * 2 * math.pi * (u @ scaled.T)  # (F, D)
        return torch.polar(torch.ones_like(angle), angle).to(self.complex_dtype)

    def shifted_blocks(self, freq_index: torch.Tensor, shift: float) -> torch.Tensor:
        """``shift * I - H(u)`` for the given frequency indices: (len, groups, n, n) complex (one GEMM)."""
        out = (self._phases(freq_index) @ self.neg_flat).reshape(len(freq_index), self.groups, self.size, self.size)
        if shift:
            out.diagonal(dim1=-2, dim2=-1).add_(shift)
        return out

    def blocks(self, freq_index: torch.Tensor) -> torch.Tensor:
        """``H(u)`` for the given frequency indices: (len, groups, n, n) complex."""
        return self.shifted_blocks(freq_index, 0.0).neg_()

    def traces(self, freq_index: torch.Tensor) -> torch.Tensor:
        """``trace H(u)`` (len, groups), real float64."""
        tr = torch.diagonal(self.G, dim1=-2, dim2=-1).sum(-1).to(torch.float64)  # (D, g)
        return (self._phases(freq_index).to(torch.complex128) @ tr.to(torch.complex128)).real

    def frequency_block(self, freq: torch.Tensor, group: int) -> torch.Tensor:
        """``B(u)`` (c_out x c_in_g * phases, columns phase-major) for one frequency and group."""
        u = freq.to(torch.float64)
        angle = -2 * math.pi * (self.q.to(torch.float64) / torch.tensor(self.coarse, dtype=torch.float64)) @ u
        phase = torch.polar(torch.ones_like(angle), angle).to(torch.complex128)
        ci = self.c_in_g
        B = torch.zeros(self.c_out, self.n_phase * ci, dtype=torch.complex128)
        for a in range(self.taps_count):
            ra = int(self.r[a])
            B[:, ra * ci:(ra + 1) * ci] += self.taps[group, a].to(torch.float64) * phase[a]
        return B


def power_top(H: torch.Tensor, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched power iteration on Hermitian PSD blocks: (Rayleigh quotients, unit vectors); the Rayleigh
    quotient is raised to a batched Lanczos estimate (``iters`` steps) when that is larger."""
    shape = H.shape[:-1]
    x = torch.complex(torch.randn(shape, generator=generator, dtype=torch.float64),
                      torch.randn(shape, generator=generator, dtype=torch.float64)).to(H.dtype)
    x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    for _ in range(iters):
        y = (H @ x.unsqueeze(-1)).squeeze(-1)
        norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        # a zero block (e.g. a frequency where the symbol vanishes) keeps its vector: no 0/0, in any dtype
        x = torch.where(norm > 0, y / torch.where(norm > 0, norm, torch.ones_like(norm)), x)
    theta = torch.einsum("...i,...i->...", x.conj(), (H @ x.unsqueeze(-1)).squeeze(-1)).real.to(torch.float64)
    flat = H.reshape(-1, *H.shape[-2:])
    ritz = batched_lanczos(lambda v: (flat @ v.unsqueeze(-1)).squeeze(-1), flat.shape[-1], flat.shape[0], H.dtype,
                           steps=min(iters, flat.shape[-1]), seed=int(torch.randint(2**31, (1,), generator=generator)))
    return torch.maximum(theta, ritz.reshape(theta.shape)), x


ESTIMATORS = ("power", "lanczos")


def top_estimate(H: torch.Tensor, iters: int, generator: torch.Generator,
                 estimator: str = "power") -> tuple[torch.Tensor, torch.Tensor]:
    """Top eigenvalue estimates and unit vectors of Hermitian PSD blocks (``H``: ``(..., n, n)``).

    ``"power"`` (the pre-issue-13 procedure, kept for ``strategy="circulant"``): ``iters`` power steps, the value
    raised to an ``iters``-step Lanczos value (``power_top``); ``"lanczos"``: one ``iters``-step Lanczos run per
    block with its Ritz vector, half the block products for a better value (the Krylov space holds the power
    iterate)."""
    if estimator == "power":
        return power_top(H, iters, generator)
    if estimator != "lanczos":
        raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    shape = H.shape[:-1]
    flat = H.reshape(-1, *H.shape[-2:])
    start = torch.complex(torch.randn(flat.shape[:-1], generator=generator, dtype=torch.float64),
                          torch.randn(flat.shape[:-1], generator=generator, dtype=torch.float64))
    theta, vec = batched_lanczos(lambda v: (flat @ v.unsqueeze(-1)).squeeze(-1), flat.shape[-1], flat.shape[0],
                                 H.dtype, steps=min(iters, flat.shape[-1]), init=start, return_vectors=True)
    return theta.reshape(shape[:-1]), vec.reshape(shape)


def fourier_certificate(
    weight: torch.Tensor,
    grid: Sequence[int],
    *,
    stride: Sequence[int] | int = 1,
    dilation: Sequence[int] | int = 1,
    groups: int = 1,
    rho: float = 0.005,
    target: float | None = None,
    accept: float | None = None,
    sample_blocks: int = 32,
    power_iters: int = 25,
    estimator: str = "power",
    give_up_above: float | Callable[[dict[str, Any]], float | None] | None = None,
    dtype: torch.dtype = torch.float64,
    max_memory_bytes: int = 2**30,
    seed: int = 0,
) -> NormValue:
    """Certified upper bound on the norm of the circular convolution on ``grid`` via per-frequency Cholesky.

    A random sample of frequency blocks gets top-eigenvalue estimates ``theta`` (``estimator``, see
    ``top_estimate``); every block ``H(u)`` is then certified ``H(u) <= mu``, ``mu = max(theta, target^2) (1 + rho)^2``,
    by a Cholesky factorisation of ``mu I - H(u)``. Blocks that fail get their own estimate and a geometrically
    growing ``mu(u)`` until certified; later blocks are certified at the highest level reached (the bound is the
    maximum anyway). With ``accept`` (a norm the caller is content with), blocks are certified at ``accept``
    where their estimate is below it. The value is ``sqrt(max_u mu(u) + margin(u))`` with a rigorous
    floating-point margin. ``details``: circulant_lower (``sqrt(max theta)``, a lower bound on the circulant's
    norm), the best frequency/group and its top input vector (warm starts), failed blocks, the margin.
    ``give_up_above``: a norm (or a function of the sampled estimate's details returning one) beyond which the
    caller has no use for the bound: when the estimate exceeds it, nothing is factorised and the value is ``inf``
    (trivially an upper bound) with ``details["gave_up"]``.

    References: Sedghi et al. (2019); Senderovich et al. (2022); Higham (2002), Thm 10.3.
    """
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"certificate dtype must be float32 or float64, got {dtype}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    t0 = time.perf_counter()
    nd = weight.dim() - 2
    grid = tuple(grid)
    strides = (stride,) * nd if isinstance(stride, int) else tuple(stride)
    dilations = (dilation,) * nd if isinstance(dilation, int) else tuple(dilation)
    if len(grid) != nd or any(g % s for g, s in zip(grid, strides)):
        raise ValueError(f"grid {grid} must have {nd} sizes, each divisible by the stride {strides}")
    fg = _FourierGram(weight, grid, strides, dilations, groups, dtype)
    n = fg.size
    if fg.frobenius2 == 0.0:  # the zero operator: its norm is exactly 0 (no Cholesky of 0 I - 0)
        return NormValue(0.0, Guarantee.UPPER, "fft_cholesky", 0, time.perf_counter() - t0, {
            **_summary(fg, grid, strides, dtype, rho), "failed": 0, "circulant_lower": 0.0,
            "argmax_frequency": [0] * nd, "argmax_group": 0, "argmax_vector": None, "max_roundoff_margin_rel": 0.0,
            "zero_operator": True})
    bytes_per = 16 if dtype == torch.float64 else 8
    chunk = max(1, int(max_memory_bytes // (bytes_per * 4 * n * n * groups)))
    n_freq = fg.freqs.shape[0]
    gen = torch.Generator().manual_seed(seed)
    top = _TopTracker(groups)
    mu0, cap = _start_level(fg, chunk, sample_blocks, power_iters, gen, top, target, accept, rho, estimator)
    gave_up = _give_up(fg, top, give_up_above, _summary(fg, grid, strides, dtype, rho), t0)
    if gave_up is not None:
        return gave_up
    # certify mu I - H >= 0 for every block
    gamma_chol, form_margin = _margins(fg, dtype)
    run = _CertRun(fg, mu0, cap, rho, power_iters, gen, top, gamma_chol, form_margin, estimator,
                   torch.eye(n, dtype=torch.complex128 if dtype == torch.float64 else torch.complex64))
    for start in range(0, n_freq, chunk):
        run.certify(torch.arange(start, min(n_freq, start + chunk)))
    f_star, g_star = top.at
    return NormValue(
        math.sqrt(max(run.best, 0.0)), Guarantee.UPPER, "fft_cholesky", run.cholesky_calls, time.perf_counter() - t0,
        {
            **_summary(fg, grid, strides, dtype, rho), "failed": run.failed,
            "circulant_lower": math.sqrt(max(top.theta, 0.0)),
            "argmax_frequency": [int(x) for x in fg.freqs[f_star]], "argmax_group": g_star,
            "argmax_vector": _top_input_vector(fg, top.vec, f_star, g_star),
            "max_roundoff_margin_rel": run.max_margin_rel,
        },
    )


def _give_up(fg: _FourierGram, top: "_TopTracker", give_up_above: Any, summary: dict[str, Any],
             t0: float) -> NormValue | None:
    """The trivial bound ``inf`` when the sampled estimate exceeds the caller's level (a number, or a function of
    the estimate's details), else None (go on and certify)."""
    if give_up_above is None:
        return None
    f_star, g_star = top.at
    estimate = {**summary, "circulant_lower": math.sqrt(max(top.theta, 0.0)),
                "argmax_frequency": [int(x) for x in fg.freqs[f_star]], "argmax_group": g_star,
                "argmax_vector": _top_input_vector(fg, top.vec, f_star, g_star)}
    level = give_up_above(estimate) if callable(give_up_above) else give_up_above
    if level is None or not estimate["circulant_lower"] > level:
        return None
    return NormValue(math.inf, Guarantee.UPPER, "fft_cholesky", 0, time.perf_counter() - t0, {
        **estimate, "failed": 0, "gave_up": True, "give_up_above": level, "max_roundoff_margin_rel": 0.0})


class _TopTracker:
    """The largest eigenvalue estimate seen so far, its vector and its (frequency index, group)."""

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.theta, self.vec, self.at = -1.0, None, (0, 0)

    def note(self, theta: torch.Tensor, vec: torch.Tensor, freq_idx: torch.Tensor) -> None:
        i = int(torch.argmax(theta))
        if float(theta[i]) > self.theta:
            f_i, g_i = divmod(i, self.groups)
            self.theta, self.vec, self.at = float(theta[i]), vec[i].clone(), (int(freq_idx[f_i]), g_i)


def _start_level(fg: _FourierGram, chunk: int, sample_blocks: int, power_iters: int, gen: torch.Generator,
                 top: _TopTracker, target: float | None, accept: float | None, rho: float,
                 estimator: str = "power") -> tuple[float, float]:
    """``(mu0, cap)``: the first certification level, from power iteration on a random sample of blocks (or
    ``target``), inflated by ``(1 + rho)^2``; ``cap`` is the level the caller accepts (``accept^2``, or inf)."""
    n_freq, n = fg.freqs.shape[0], fg.size
    sample = torch.randperm(n_freq, generator=gen)[: max(1, min(sample_blocks, n_freq, chunk))]
    H = fg.blocks(sample).reshape(-1, n, n)
    theta_s, vec_s = top_estimate(H, power_iters, gen, estimator)
    top.note(theta_s, vec_s, sample)
    mu0 = max(float(theta_s.max()), (target or 0.0) ** 2, 0.0) * (1 + rho) ** 2
    cap = (accept ** 2) * (1 - 1e-6) if accept else math.inf
    if float(theta_s.max()) * (1 + 1e-9) < cap < mu0:
        mu0 = cap  # a level the caller is content with: certify there rather than at the inflated estimate
    return mu0, cap


class _CertRun:
    """Certification of ``mu I - H(u) >= 0`` chunk by chunk; the level ``mu0`` only grows (the bound is a max)."""

    def __init__(self, fg: _FourierGram, mu0: float, cap: float, rho: float, power_iters: int,
                 gen: torch.Generator, top: _TopTracker, gamma_chol: float, form_margin: float,
                 estimator: str, eye: torch.Tensor) -> None:
        self.fg, self.mu0, self.cap, self.rho, self.power_iters, self.gen, self.top = \
            fg, mu0, cap, rho, power_iters, gen, top
        self.gamma_chol, self.form_margin, self.estimator, self.eye = gamma_chol, form_margin, estimator, eye
        self.best, self.failed, self.max_margin_rel, self.cholesky_calls = 0.0, 0, 0.0, 0

    def certify(self, idx: torch.Tensor) -> None:
        fg, n, groups, rho = self.fg, self.fg.size, self.fg.groups, self.rho
        S = fg.shifted_blocks(idx, self.mu0).reshape(-1, n, n)  # mu0 I - H(u)
        mu = torch.full((S.shape[0],), self.mu0, dtype=torch.float64)
        _, info = torch.linalg.cholesky_ex(S)
        self.cholesky_calls += S.shape[0]
        bad = (info != 0).nonzero().flatten()
        if bad.numel():
            self.failed += int(bad.numel())
            H_bad = S[bad].neg_()
            H_bad.diagonal(dim1=-2, dim2=-1).add_(self.mu0)
            # a failed block needs a good estimate: the pre-issue procedure runs 3x the power steps, the
            # Lanczos estimator twice the steps (one block product each)
            iters = 3 * self.power_iters if self.estimator == "power" else 2 * self.power_iters
            theta_b, vec_b = top_estimate(H_bad, iters, self.gen, self.estimator)
            self.top.note(theta_b, vec_b, idx.repeat_interleave(groups)[bad] if groups > 1 else idx[bad])
            mu_b = torch.clamp(theta_b, min=self.mu0 / (1 + rho) ** 2) * (1 + rho) ** 2 + self.form_margin
            cap = self.cap
            mu_b = torch.where((theta_b * (1 + 1e-9) < cap) & (mu_b > cap), torch.full_like(mu_b, cap), mu_b)
            self.cholesky_calls += _recertify(H_bad, mu_b, rho, self.eye)
            mu[bad] = mu_b
            # the bound is a maximum: later blocks may as well be certified at the level reached
            self.mu0 = max(self.mu0, float(mu_b.max()))
        del S
        trace_h = fg.traces(idx).reshape(-1)
        trace_b = torch.clamp(n * mu - trace_h, min=0.0)
        margin = self.gamma_chol * trace_b * (1 + 2 * self.gamma_chol) + self.form_margin
        self.best = max(self.best, float((mu + margin).max()))
        self.max_margin_rel = max(self.max_margin_rel, float((margin / torch.clamp(mu, min=1e-300)).max()))


def _summary(fg: _FourierGram, grid: Sequence[int], strides: Sequence[int], dtype: torch.dtype,
             rho: float) -> dict[str, Any]:
    return {"grid": list(grid), "blocks": fg.n_blocks, "block_size": fg.size, "side": fg.side, "rho": rho,
            "coarse_grid": list(fg.coarse), "stride": list(strides), "dtype": str(dtype).replace("torch.", "")}


def _margins(fg: _FourierGram, dtype: torch.dtype) -> tuple[float, float]:
    """(Cholesky backward-error factor, bound on ``||H_computed - H||_2``) in the certificate's precision."""
    u = unit_roundoff(dtype)
    inner = fg.c_in_g if fg.side == "out" else fg.c_out
    gamma_form = gamma(4 * (inner + 2 * fg.taps_count + len(fg.deltas) + 4), u)
    return gamma(4 * (fg.size + 1), u), gamma_form * fg.taps_count * fg.frobenius2 * 2


def _recertify(H_bad: torch.Tensor, mu_b: torch.Tensor, rho: float, eye: torch.Tensor) -> int:
    """Cholesky of ``mu_b I - H`` for blocks that failed, raising ``mu_b`` (in place) by ``1 + rho 2^k`` at the
    k-th retry until each succeeds; returns the number of factorisations."""
    todo = torch.arange(H_bad.shape[0])
    calls = 0
    for k in range(400):
        shift = mu_b[todo].to(eye.real.dtype)[:, None, None] * eye
        _, info_b = torch.linalg.cholesky_ex(shift - H_bad[todo])
        calls += int(todo.numel())
        still = info_b != 0
        if not still.any():
            return calls
        todo = todo[still]
        mu_b[todo] = mu_b[todo] * (1 + rho * 2.0 ** min(k, 20))  # geometric steps: few retries for tiny rho
    raise RuntimeError("Cholesky certificate did not succeed; the weights may contain NaN/Inf")  # pragma: no cover


def _top_input_vector(fg: _FourierGram, best_vec: torch.Tensor | None, f_star: int, g_star: int) -> torch.Tensor | None:
    """The top right singular vector of the best block (a warm start), unit norm."""
    if best_vec is None:
        return None
    if fg.side == "out":
        in_vec = fg.frequency_block(fg.freqs[f_star], g_star).mH @ best_vec.to(torch.complex128)
    else:
        in_vec = best_vec.to(torch.complex128)
    nv = torch.linalg.vector_norm(in_vec)
    return in_vec / nv if nv > 0 else in_vec


def _dirichlet_window(spatial: Sequence[int]) -> torch.Tensor:
    """``prod_axes sin(pi (i + 1) / (n + 1))`` over the spatial grid (float64)."""
    win = torch.ones((), dtype=torch.float64)
    for axis, n in enumerate(spatial):
        shape = [1] * len(spatial)
        shape[axis] = n
        win = win * torch.sin(math.pi * (torch.arange(n, dtype=torch.float64) + 1) / (n + 1)).reshape(shape)
    return win


def plane_wave(
    op: Any, frequency: Sequence[int], group: int, vector: torch.Tensor, coarse: Sequence[int],
    grid_offset: Sequence[int], window: bool = False
) -> torch.Tensor:
    """Real input ``x[c, s P + r - offset] = Re(v[r, c] exp(-+2 pi i <u, P> / M))`` restricted to the input,
    the better of the two signs by Rayleigh quotient; a warm start for the top singular vector. ``window``:
    multiplied by ``prod_axes sin(pi (i + 1) / (n + 1))``, the lowest Dirichlet mode, closer to the top singular
    vector of a zero-padded layer (its first Rayleigh quotient was 3-7% higher on 32x32 to 8x8 random layers)."""
    spatial = op.in_shape[1:]
    stride = op.stride
    c_in_g = op.weight.shape[1]
    n_phase = math.prod(stride)
    if vector is None:  # a fixed draw: the same layer always gets the same warm start (reproducible bounds)
        return torch.randn((1, *op.in_shape), dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(op.dtype)
    v = vector.reshape(n_phase, c_in_g)
    best, best_x = -1.0, None
    for sign in (-1.0, 1.0):
        coords = torch.meshgrid(*[torch.arange(n) for n in spatial], indexing="ij")
        angle = torch.zeros(spatial, dtype=torch.float64)
        phase_idx = torch.zeros(spatial, dtype=torch.long)
        for axis, (pos, off, s, M, uu) in enumerate(zip(coords, grid_offset, stride, coarse, frequency)):
            t = pos + off
            angle = angle + sign * 2 * math.pi * uu * torch.div(t, s, rounding_mode="floor").double() / M
            phase_idx = phase_idx * s + (t % s)
        wave = torch.polar(torch.ones_like(angle), angle)  # spatial
        vals = v[phase_idx]  # spatial x c_in_g
        x_g = (vals * wave.unsqueeze(-1)).real.movedim(-1, 0)  # (c_in_g, *spatial)
        x = torch.zeros(op.in_shape, dtype=torch.float64)
        x[group * c_in_g:(group + 1) * c_in_g] = x_g * (_dirichlet_window(spatial) if window else 1.0)
        x = x.to(op.dtype).unsqueeze(0)
        nx = float(torch.linalg.vector_norm(x.double()))
        if nx == 0:
            continue
        with torch.no_grad():
            ratio = float(torch.linalg.vector_norm(op.forward(x).double())) / nx
        if ratio > best:
            best, best_x = ratio, x / nx
    if best_x is not None:
        return best_x
    return torch.randn((1, *op.in_shape), dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(op.dtype)
