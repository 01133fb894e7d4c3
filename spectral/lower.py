"""Certified lower bounds on the spectral norm of any linear map (matrix-free, forward/adjoint only).

Every returned value is a Rayleigh-type quotient ``||A v|| / ||v||`` of a computed vector ``v``
(returned in ``details["vector"]`` for warm starts), evaluated with one final forward pass, so it is
``<= ||A||`` up to the rounding of that pass, whatever the solver did before.

- ``"power"``: power iteration on ``A^T A`` (von Mises); stops when the relative change of the
  quotient falls below ``tol``.
- ``"lanczos"``: symmetric Lanczos on ``A^T A`` with full reorthogonalisation and explicit restarts
  from the top Ritz vector; stops when the Ritz residual ``||A^T A v - theta v|| <= tol * theta``.

References: Golub & Van Loan, "Matrix Computations" (power method, Lanczos with full
reorthogonalisation); Lanczos, J. Res. Nat. Bur. Standards 45 (1950).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from spectral.guarantee import Guarantee, NormValue
from spectral.operators import _map_device, _map_dtype, check_linear_map

LOWER_METHODS = ("power", "lanczos")


def _initial_vector(m: Any, init: torch.Tensor | None, seed: int) -> torch.Tensor:
    dtype, device = _map_dtype(m), _map_device(m)
    shape = tuple(m.in_shape)
    if init is not None:
        if not isinstance(init, torch.Tensor):
            raise TypeError(f"init must be a torch.Tensor, got {type(init).__name__}")
        if init.numel() != math.prod(shape):
            raise ValueError(f"init must have {math.prod(shape)} entries (in_shape {shape}), got {tuple(init.shape)}")
        if init.dtype != dtype:
            raise TypeError(f"init has dtype {init.dtype} but the map is {dtype}; convert it explicitly")
        v = init.detach().reshape(1, *shape).clone()
        if torch.linalg.vector_norm(v) > 0:
            return v
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((1, *shape), generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def _rayleigh(m: Any, v: torch.Tensor) -> float:
    """``||A v|| / ||v||`` accumulated in float64."""
    with torch.no_grad():
        av = m.forward(v)
    num = torch.linalg.vector_norm(av.to(torch.float64)).item()
    den = torch.linalg.vector_norm(v.to(torch.float64)).item()
    return num / den if den > 0 else 0.0


def power_iteration(
    m: Any, tol: float = 1e-6, max_iter: int = 1000, init: torch.Tensor | None = None, seed: int = 0
) -> tuple[float, torch.Tensor, int, bool]:
    """Power iteration on ``A^T A``; returns ``(||A v||, v, iterations, converged)`` with ``||v|| = 1``."""
    v = _initial_vector(m, init, seed)
    v = v / torch.linalg.vector_norm(v)
    sigma_prev = 0.0
    converged = False
    it = 0
    with torch.no_grad():
        for it in range(1, max_iter + 1):
            av = m.forward(v)
            sigma = torch.linalg.vector_norm(av).item()
            w = m.adjoint(av)
            nw = torch.linalg.vector_norm(w)
            if nw == 0:  # A v = 0 on the start vector: the map may be zero
                break
            v = w / nw
            if abs(sigma - sigma_prev) <= tol * max(sigma, 1e-300):
                converged = True
                break
            sigma_prev = sigma
    return _rayleigh(m, v), v, it, converged


def lanczos(
    m: Any,
    tol: float = 1e-6,
    max_iter: int = 300,
    init: torch.Tensor | None = None,
    seed: int = 0,
    basis_size: int = 40,
    stall_tol: float | None = None,
) -> tuple[float, torch.Tensor, int, bool]:
    """Lanczos on ``A^T A`` with full reorthogonalisation and restarts; returns
    ``(||A v||, v, matvecs, converged)`` with ``v`` the top Ritz vector (``||v|| = 1``). ``stall_tol``: also stop
    (not "converged") once a step raises the top Ritz value's square root by at most this fraction."""
    v = _initial_vector(m, init, seed)
    shape = v.shape
    v = v.reshape(-1)
    v = v / torch.linalg.vector_norm(v)
    n = v.numel()
    basis_size = max(2, min(basis_size, n))
    matvecs = 0
    converged = stalled = False
    previous = 0.0

    def apply(x: torch.Tensor) -> torch.Tensor:
        return m.adjoint(m.forward(x.reshape(shape))).reshape(-1)

    with torch.no_grad():
        while matvecs < max_iter and not converged and not stalled:
            Q = torch.zeros(basis_size, n, dtype=v.dtype, device=v.device)
            alphas: list[float] = []
            betas: list[float] = []
            Q[0] = v
            ritz = v
            for j in range(basis_size):
                w = apply(Q[j])
                matvecs += 1
                alpha = torch.dot(Q[j], w).item()
                alphas.append(alpha)
                # full reorthogonalisation (twice is enough)
                for _ in range(2):
                    w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
                beta = torch.linalg.vector_norm(w).item()
                k = j + 1
                T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
                if k > 1:
                    off = torch.tensor(betas, dtype=torch.float64)
                    T += torch.diag(off, 1) + torch.diag(off, -1)
                evals, evecs = torch.linalg.eigh(T)
                theta, y = evals[-1].item(), evecs[:, -1]
                residual = beta * abs(y[-1].item())
                ritz = (y.to(Q.dtype).to(Q.device) @ Q[:k])
                scale = max(abs(theta), 1e-300)
                if residual <= tol * scale or beta <= 1e-14 * scale or k == n:
                    converged = True
                    break
                stalled = stall_tol is not None and previous > 0 and \
                    math.sqrt(max(theta, 0.0) / previous) - 1 <= stall_tol
                previous = max(theta, previous)
                if stalled:
                    break
                if matvecs >= max_iter or j == basis_size - 1:
                    break
                betas.append(beta)
                Q[j + 1] = w / beta
            v = ritz / torch.linalg.vector_norm(ritz)
    v = v.reshape(shape)
    return _rayleigh(m, v), v, matvecs, converged


_SOLVERS: dict[str, Callable[..., tuple[float, torch.Tensor, int, bool]]] = {
    "power": power_iteration,
    "lanczos": lanczos,
}


def operator_norm_lower(
    m: Any,
    method: str = "lanczos",
    tol: float = 1e-6,
    max_iter: int | None = None,
    init: torch.Tensor | None = None,
    seed: int = 0,
    stall_tol: float | None = None,
) -> NormValue:
    """Certified lower bound ``||A v|| / ||v||`` on ``||A||_2`` for any linear map.

    ``method`` is ``"power"`` or ``"lanczos"``; ``init`` warm-starts from a previous vector (shape
    ``in_shape``); ``details["vector"]`` holds the final unit vector, ``details["converged"]`` whether
    ``tol`` was met within ``max_iter`` forward/adjoint pairs; ``stall_tol`` (Lanczos): stop early once a step
    raises the estimate by at most that fraction (the value stays a certified lower bound whenever it stops).
    References: Golub & Van Loan, Matrix Computations (power method; Lanczos).
    """
    check_linear_map(m)
    if method not in _SOLVERS:
        raise ValueError(f"unknown lower-bound method {method!r}; valid: {', '.join(LOWER_METHODS)}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    if max_iter is None:
        max_iter = 1000 if method == "power" else 300
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    t0 = time.perf_counter()
    extra = {"stall_tol": stall_tol} if stall_tol is not None and method == "lanczos" else {}
    value, v, iters, converged = _SOLVERS[method](m, tol=tol, max_iter=max_iter, init=init, seed=seed, **extra)
    return NormValue(
        value=value,
        guarantee=Guarantee.LOWER,
        method=method,
        iterations=iters,
        seconds=time.perf_counter() - t0,
        details={"vector": v.reshape(tuple(m.in_shape)).detach(), "converged": converged, "tol": tol},
    )


def batched_lanczos(apply: Callable[[torch.Tensor], torch.Tensor], dim: int, batch: int, dtype: torch.dtype,
                    steps: int = 40, seed: int = 0, *, init: torch.Tensor | None = None,
                    return_vectors: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Top Ritz values (float64, ``(batch,)``) of ``batch`` Hermitian PSD operators (``apply`` maps
    ``(batch, dim)`` to ``(batch, dim)``) after ``steps`` Lanczos steps with full reorthogonalisation. An
    *estimate* (from below in exact arithmetic), used only to choose the levels that certificates try.
    ``init``: start vectors ``(batch, dim)`` (default: a seeded random draw); ``return_vectors``: also the unit
    top Ritz vectors ``(batch, dim)``."""
    if init is not None:
        v = init.to(dtype).reshape(batch, dim)
    else:
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(batch, dim, generator=g, dtype=torch.float64).to(dtype)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    steps = max(1, min(steps, dim))
    Q = torch.zeros(batch, steps, dim, dtype=dtype)  # batch-major: the projections are batched products
    T = torch.zeros(batch, steps, steps, dtype=torch.float64)
    k = 0
    for j in range(steps):
        Q[:, j] = v
        w = apply(v)
        T[:, j, j] = torch.linalg.vecdot(v, w).real.to(torch.float64)
        basis = Q[:, : j + 1]
        for _ in range(2):  # full reorthogonalisation, twice: w -= Q (Q^H w)
            w = w - torch.matmul(torch.matmul(basis.conj(), w.unsqueeze(-1)).transpose(1, 2), basis).squeeze(1)
        beta = torch.linalg.vector_norm(w, dim=1)
        k = j + 1
        if j + 1 == steps or bool((beta <= 1e-13 * T[:, : j + 1, : j + 1].diagonal(dim1=1, dim2=2).abs().amax(1)
                                   .clamp(min=1e-300)).all()):
            break
        T[:, j, j + 1] = T[:, j + 1, j] = beta.to(torch.float64)
        v = torch.where(beta[:, None] > 0, w / torch.where(beta > 0, beta, 1.0)[:, None].to(w.dtype), w)
    if not return_vectors:
        return torch.linalg.eigvalsh(T[:, :k, :k])[:, -1].clamp(min=0.0)
    evals, evecs = torch.linalg.eigh(T[:, :k, :k])
    ritz = torch.matmul(evecs[:, :, -1:].transpose(1, 2).to(dtype), Q[:, :k]).squeeze(1)
    ritz = ritz / torch.linalg.vector_norm(ritz, dim=1, keepdim=True).clamp(min=1e-300).to(dtype)
    return evals[:, -1].clamp(min=0.0), ritz




__all__ = ["LOWER_METHODS", "operator_norm_lower", "power_iteration", "lanczos", "batched_lanczos"]
