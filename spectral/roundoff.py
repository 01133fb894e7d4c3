"""Rigorous floating-point margins for the certified bounds (one home for round-off arithmetic).

Every certificate in ``spectral`` is computed in floating point; these functions turn standard error bounds
(Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed.: Lemma 3.1/3.5 for sums and products,
Thm 10.3 for Cholesky) into explicit margins that are added to the computed value, so that the reported number
bounds the exact-arithmetic quantity. ``gamma(n, u) = n u / (1 - n u)``; complex arithmetic and blocked BLAS
orderings are covered by taking ``n`` a small multiple of the number of terms (factor 4).

References: Higham (2002), Thms 3.5, 10.3; Demmel, "On floating point errors in Cholesky" (1989); Rump,
"Verification of positive definiteness", BIT 46 (2006).
"""
from __future__ import annotations

import math

import torch

__all__ = ["unit_roundoff", "gamma", "cholesky_margin", "gram_margin_rel", "tap_sum_error",
           "certified_matrix_norms", "frobenius_upper"]


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit round-off ``u = eps / 2`` of a real or complex floating dtype."""
    real = {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)
    return float(torch.finfo(real).eps) / 2.0


def gamma(n: int | float, u: float) -> float:
    """``gamma_n = n u / (1 - n u)`` (Higham's constant); refuses ``n u >= 1/2`` (no useful bound)."""
    nu = float(n) * u
    if nu >= 0.5:
        raise ValueError(f"matrix too large for a float round-off certificate in this precision (n*u={nu:.2g}); "
                         "use float64")
    return nu / (1.0 - nu)


def cholesky_margin(trace: torch.Tensor, terms: int, dtype: torch.dtype) -> torch.Tensor:
    """Bound on ``||Delta S||_2`` when a floating-point Cholesky of ``S`` ran to completion.

    ``L L^H = S + Delta S`` with ``|Delta S| <= gamma_{terms+1} |L| |L^H|`` (Higham Thm 10.3; ``terms`` is the
    longest inner product, e.g. the band width of a banded factor), and ``|| |L||L^H| ||_2 <= ||L||_F^2 =
    trace(L L^H) <= trace(S) / (1 - gamma)``. ``trace`` is ``trace(S)`` (any shape, computed in float64).
    """
    g = gamma(4 * (terms + 1), unit_roundoff(dtype))
    return torch.clamp(trace.to(torch.float64), min=0.0) * (g / (1.0 - g)) * (1.0 + 2.0 * g)


def gram_margin_rel(n: int, dtype: torch.dtype) -> float:
    """Relative margin of a floating-point Gram-iteration upper bound on ``n x n`` (or smaller) matrices.

    One Gram step ``X -> fl(X^H X) / r`` with ``||X||_F = 1`` satisfies ``sigma(X)^2 <= r sigma(X') (1 + delta)``
    with ``delta <= (2 u ||Y||_F + gamma_{4n} ||X||_F^2) / (r sigma(X'))`` and ``r >= ||X||_F^2 / sqrt(n)``,
    ``sigma(X') >= 1 / sqrt(n)`` (rank <= n), so ``delta <= 2 u sqrt(n) + n gamma_{4n}`` up to second order;
    the logs of the step factors enter the final bound with weights ``2^-t`` summing to 1, the normalisation
    and the final Frobenius norm add a few ``u`` (derivation in docs/spectral.md). Doubled for safety.
    """
    u = unit_roundoff(dtype)
    return 2.0 * (n * gamma(4 * n + 4, u) + 2.0 * u * math.sqrt(n) + gamma(8, u))


def tap_sum_error(abs_sum_frobenius: float, terms: int, max_phase_index: float, dtype: torch.dtype) -> float:
    """Bound on ``||B_computed - B||_2`` for a block ``B = sum_a W_a phase_a`` summed over ``terms`` taps.

    Each phase ``exp(i angle)`` with ``|angle| <= 2 pi max_phase_index`` carries an error of at most
    ``(4 pi max_phase_index + 4) u``; the sum adds ``gamma_{terms}``; ``||.||_2 <= ||.||_F <= error *
    sum_a ||W_a||_F`` (``abs_sum_frobenius``).
    """
    u = unit_roundoff(dtype)
    phase = (4.0 * math.pi * max(max_phase_index, 1.0) + 4.0) * u
    return (2.0 * phase + gamma(4 * terms + 4, u)) * abs_sum_frobenius


def frobenius_upper(t: torch.Tensor) -> float:
    """``||t||_F`` computed in float64 and rounded up by a rigorous relative margin."""
    value = float(torch.linalg.vector_norm(t.detach().to(torch.complex128 if t.is_complex() else torch.float64)))
    return value * (1.0 + gamma(t.numel() + 4, unit_roundoff(torch.float64)))


def certified_matrix_norms(mats: torch.Tensor, slack: float = 1e-9) -> torch.Tensor:
    """Rigorous upper bounds on ``||M||_2`` for a batch of real or complex matrices ``(..., p, q)`` (float64).

    Estimate ``sigma`` by a float64 SVD, then certify ``mu = (sigma (1 + slack))^2 >= ||M||^2`` by a Cholesky
    factorisation of ``mu I - M^H M`` (smaller side), adding the Cholesky margin and the error of forming the
    Gram matrix; a failed block retries with a 10x larger slack. Zero matrices give exactly 0.
    """
    cdt = torch.complex128 if mats.is_complex() else torch.float64
    m = mats.detach().to(cdt)
    if m.shape[-1] > m.shape[-2]:
        m = m.mH
    batch = m.shape[:-2]
    m = m.reshape(-1, *m.shape[-2:])
    p, q = m.shape[-2:]
    out = torch.zeros(m.shape[0], dtype=torch.float64)
    if m.numel() == 0:
        return out.reshape(batch)
    fro2 = torch.linalg.matrix_norm(m, ord="fro").to(torch.float64) ** 2
    sigma = torch.linalg.svdvals(m)[..., 0].to(torch.float64) if q > 0 else torch.zeros(m.shape[0])
    gram = m.mH @ m
    form = gamma(4 * p + 4, unit_roundoff(torch.float64)) * fro2  # ||fl(M^H M) - M^H M||_2
    eye = torch.eye(q, dtype=cdt)
    todo = torch.nonzero(fro2 > 0).flatten()
    s = slack
    for _ in range(12):
        if todo.numel() == 0:
            break
        mu = (sigma[todo] * (1 + s)) ** 2 + 2 * form[todo]
        S = mu.to(cdt)[:, None, None] * eye - gram[todo]
        _, info = torch.linalg.cholesky_ex(S)
        ok = info == 0
        trace = q * mu - torch.diagonal(gram[todo], dim1=-2, dim2=-1).real.sum(-1).to(torch.float64)
        # + rounding of the diagonal shift mu - g_ii (relative u, |g_ii| <= mu)
        bound = mu * (1 + 4 * unit_roundoff(torch.float64)) + cholesky_margin(trace, q, torch.float64) + form[todo]
        out[todo[ok]] = torch.sqrt(bound[ok])
        todo = todo[~ok]
        s *= 10
    if todo.numel():  # pragma: no cover - only for non-finite input
        raise RuntimeError("could not certify a matrix norm; the weights may contain NaN/Inf")
    return out.reshape(batch)
