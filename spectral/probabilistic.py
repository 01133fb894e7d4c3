"""Probabilistic upper bounds on an operator norm from a Krylov method with a random start.

Let ``A = M^T M`` (``n x n``, PSD, ``lambda_1 = ||M||^2``) and ``b`` uniform on the unit sphere of R^n.
For any polynomial ``p`` of degree ``<= k-1`` the largest Ritz value ``theta`` of ``A`` on the Krylov space
``span{b, A b, ..., A^(k-1) b}`` is at least the Rayleigh quotient of ``p(A) b``. Writing ``beta_1`` for the
component of ``b`` along a top eigenvector, ``theta <= (1 - eps) lambda_1`` forces
``beta_1^2 / (1 - beta_1^2) <= M_p(eps) / eps`` with
``M_p(eps) = max_{x in [0, 1-eps]} p(x)^2 (1 - eps - x) / p(1)^2``, and ``beta_1^2 ~ Beta(1/2, (n-1)/2)``.
So the failure probability is at most ``I_{tau/(1+tau)}(1/2, (n-1)/2)`` (regularised incomplete beta,
``tau = M_p(eps)/eps``), minimised over two polynomials: the power polynomial ``x^(k-1)`` and the shifted
Chebyshev polynomial ``T_(k-1)(2x/(1-eps) - 1)``. This is the argument of Kuczynski & Wozniakowski (1992),
written with an exact beta tail instead of their constants. Given ``delta`` we solve for the smallest
``eps`` whose failure probability is ``<= delta`` and report ``sqrt(theta / (1 - eps))``:
``P(||M|| > value) <= delta`` over the random start (the matrix is fixed; the start must not depend on it,
so warm starts are refused).

Labelled ``PROBABILISTIC_UPPER`` with ``details["failure_probability"] = delta``. Products with ``A`` run
in float64 (float32 matrices and ``spectral.operators`` maps are converted exactly; other maps must be
float64), and the Ritz value carries a relative round-off margin of 1e-9. When the Krylov space becomes
invariant (residual ``beta <= 1e-12 theta``) the bound is ``theta + beta``, with no probabilistic slack.

References: Kuczynski & Wozniakowski (1992), "Estimating the largest eigenvalue by the power and Lanczos
algorithms with a random start", SIAM J. Matrix Anal. Appl. 13(4).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from scipy.special import betainc

from spectral.guarantee import Guarantee, NormValue

__all__ = [
    "krylov_failure_probability",
    "krylov_relative_error",
    "probabilistic_upper",
    "PROBABILISTIC_METHODS",
]

PROBABILISTIC_METHODS = ("lanczos", "power")
# relative margin on the float64 Ritz value for round-off (its error is ~ k n 2^-53, far below this)
ROUNDOFF_MARGIN = 1e-9


def _power_polynomial_ratio(k: int, eps: float) -> float:
    """``max_{x in [0,1-eps]} x^(2j) (1-eps-x)`` with ``j = k-1`` (closed form)."""
    j2 = 2 * (k - 1)
    if j2 == 0:
        return 1.0 - eps
    return (1.0 - eps) ** (j2 + 1) * math.exp(j2 * math.log(j2) - (j2 + 1) * math.log(j2 + 1))


def _chebyshev_polynomial_ratio(k: int, eps: float) -> float:
    """Upper bound ``(1-eps) / T_(k-1)((1+eps)/(1-eps))^2`` (|T| <= 1 on the shifted interval)."""
    degree = k - 1
    if degree == 0:
        return 1.0 - eps
    x = (1.0 + eps) / (1.0 - eps)
    log_t = degree * math.acosh(x)  # T_d(x) = cosh(d acosh x) >= exp(d acosh x) / 2
    log_cheb = log_t - math.log(2.0)
    if log_cheb < 0:
        log_cheb = math.log(math.cosh(log_t)) if log_t < 700 else log_cheb
    return (1.0 - eps) * math.exp(-2.0 * log_cheb)


def krylov_failure_probability(n: int, k: int, eps: float, method: str = "lanczos") -> float:
    """Upper bound on ``P(theta_k <= (1-eps) lambda_1)`` for a uniformly random start in R^n.

    ``k`` is the Krylov dimension (``k`` products with ``A``); ``method`` "power" uses the Rayleigh quotient
    of ``A^(k-1) b``, "lanczos" the largest Ritz value on the k-dimensional Krylov space.

    References: Kuczynski & Wozniakowski (1992).
    """
    if method not in PROBABILISTIC_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(PROBABILISTIC_METHODS)}")
    if n < 1 or k < 1:
        raise ValueError(f"need n >= 1 and k >= 1, got n={n}, k={k}")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    if n == 1:
        return 0.0  # one dimension: the Rayleigh quotient is exact
    ratio = _power_polynomial_ratio(k, eps)
    if method == "lanczos":
        ratio = min(ratio, _chebyshev_polynomial_ratio(k, eps))
    tau = ratio / eps
    return float(betainc(0.5, 0.5 * (n - 1), tau / (1.0 + tau)))


def krylov_relative_error(n: int, k: int, delta: float, method: str = "lanczos") -> float:
    """Smallest ``eps`` with ``krylov_failure_probability(n, k, eps) <= delta`` (1.0 when none < 1 works)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta (failure probability) must be in (0, 1), got {delta}")
    if n == 1:
        return 0.0
    hi = 1.0 - 1e-12
    if krylov_failure_probability(n, k, hi, method) > delta:
        return 1.0
    lo = 0.0
    for _ in range(80):  # bisection: the failure probability decreases in eps
        mid = 0.5 * (lo + hi)
        if krylov_failure_probability(n, k, mid, method) <= delta:
            hi = mid
        else:
            lo = mid
    return hi


def _float64_map(op: Any) -> Any | None:
    """The same linear map with float64 parameters (float32 -> float64 is exact), or None for an unknown map."""
    from spectral.operators import ChannelScale, ComposedMap, LayerOperator, Reshape, SumMap

    if getattr(op, "dtype", None) == torch.float64:
        return op
    if isinstance(op, LayerOperator):
        return op.with_weight(op.weight.to(torch.float64))
    if isinstance(op, ChannelScale):
        return ChannelScale(op.in_shape, op.scale.to(torch.float64))
    if isinstance(op, Reshape):
        return Reshape(op.in_shape, op.out_shape, dtype=torch.float64)
    if isinstance(op, (ComposedMap, SumMap)):
        parts = [_float64_map(m) for m in op.maps]
        return None if any(m is None for m in parts) else type(op)(parts)
    return None


def _matrix_products(map_or_matrix: Any) -> tuple[int, Callable[[torch.Tensor], torch.Tensor], torch.dtype]:
    """``(n, v -> M^T M v, dtype)`` for a 2-D tensor or a linear map with forward/adjoint/in_shape.

    Products run in float64: a float32 matrix or a known float32 map (``spectral.operators``) is converted
    (exactly); any other map must already be float64, because float32 products carry a round-off (up to
    ~1e-7 relative) that the probabilistic bound does not cover.
    """
    if torch.is_tensor(map_or_matrix):
        if map_or_matrix.dim() != 2:
            raise ValueError(f"a matrix must be 2-D, got shape {tuple(map_or_matrix.shape)}")
        mat = map_or_matrix.detach()
        if not torch.is_floating_point(mat):
            raise TypeError(f"matrix must be floating point, got {mat.dtype}")
        mat = mat.to(torch.float64)
        return mat.shape[1], (lambda v: mat.T @ (mat @ v.to(mat.device)).cpu()), torch.float64
    needed = ("in_shape", "forward", "adjoint")
    if not all(hasattr(map_or_matrix, a) for a in needed):
        raise TypeError(
            "expected a 2-D tensor or a linear map with in_shape/out_shape/forward/adjoint "
            f"(e.g. spectral.operators.LayerOperator), got {type(map_or_matrix).__name__}"
        )
    op = _float64_map(map_or_matrix)
    if op is None:
        dtype = getattr(map_or_matrix, "dtype", None)
        raise TypeError(
            f"probabilistic_upper runs its products in float64, but {type(map_or_matrix).__name__} has dtype "
            f"{dtype} and cannot be converted; build the map in float64 (and give it dtype = torch.float64)"
        )
    in_shape = tuple(op.in_shape)
    n = math.prod(in_shape)
    device = getattr(op, "device", torch.device("cpu"))

    def gram(v: torch.Tensor) -> torch.Tensor:
        x = v.to(device=device, dtype=torch.float64).reshape(1, *in_shape)
        with torch.no_grad():
            return op.adjoint(op.forward(x)).reshape(-1).cpu()

    return n, gram, torch.float64


def _power_steps(gram: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, n: int, delta: float, max_iter: int,
                 min_iter: int, target_eps: float) -> tuple[float, float, float, int]:
    """Power method on ``M^T M`` from ``b``: (Ritz value, residual, relative eps, products)."""
    theta, eps, k = 0.0, 1.0, 0
    v = b
    for k in range(1, max_iter + 1):
        w = gram(v)
        theta = float(torch.dot(v, w))  # Rayleigh quotient of A^(k-1) b
        eps = krylov_relative_error(n, k, delta, "power")
        if k >= min_iter and eps <= target_eps:
            break
        norm = w.norm()
        if norm == 0:
            eps = 0.0  # A^k b = 0 with b random: A = 0 almost surely
            break
        v = w / norm
    return theta, 0.0, eps, k


def _lanczos_steps(gram: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, n: int, delta: float,
                   max_iter: int, min_iter: int, target_eps: float) -> tuple[float, float, float, int]:
    """Lanczos with full reorthogonalisation on ``M^T M`` from ``b``: (Ritz value, residual, relative eps, k)."""
    theta = residual = 0.0
    eps, k = 1.0, 0
    basis = torch.empty(max_iter, n, dtype=torch.float64)
    alphas: list[float] = []
    betas: list[float] = []
    q = b
    for k in range(1, max_iter + 1):
        basis[k - 1] = q
        w = gram(q)
        alpha = float(torch.dot(q, w))
        alphas.append(alpha)
        w = w - basis[:k].T @ (basis[:k] @ w)  # full reorthogonalisation (twice is enough)
        w = w - basis[:k].T @ (basis[:k] @ w)
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
        theta = float(torch.linalg.eigvalsh(tri)[-1])
        beta = float(w.norm())
        eps = krylov_relative_error(n, k, delta, "lanczos")
        if beta <= 1e-12 * max(abs(theta), 1e-300):
            # invariant subspace: every Ritz value is within beta of an eigenvalue of A, and the space holds
            # b's (almost surely non-zero) top-eigenvector component, so lambda_1 <= theta + beta
            return theta, beta, 0.0, k
        if k >= min_iter and eps <= target_eps:
            break
        betas.append(beta)
        q = w / beta
    return theta, residual, eps, k


def probabilistic_upper(
    map_or_matrix: Any,
    delta: float = 1e-3,
    method: str = "lanczos",
    rtol: float = 0.01,
    max_iter: int = 300,
    min_iter: int = 2,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> NormValue:
    """``||M||`` bounded above with probability ``>= 1 - delta`` over a random Krylov start.

    Runs the power method or Lanczos (full reorthogonalisation, float64) on ``M^T M`` from a uniformly
    random unit vector until the bound is within ``rtol`` of the Ritz estimate (``sqrt(1/(1-eps)) - 1 <=
    rtol``) or ``max_iter`` products. ``details``: failure_probability, relative_eps, ritz_value (a lower
    bound on ``||M||``), krylov_dim, n. If even ``max_iter`` cannot reach ``delta`` the value is ``inf``.

    References: Kuczynski & Wozniakowski (1992).
    """
    if method not in PROBABILISTIC_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(PROBABILISTIC_METHODS)}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta (failure probability) must be in (0, 1), got {delta}")
    if rtol <= 0:
        raise ValueError(f"rtol must be > 0, got {rtol}")
    if max_iter < 1 or min_iter < 1:
        raise ValueError(f"max_iter and min_iter must be >= 1, got {max_iter}, {min_iter}")
    start = time.perf_counter()
    n, gram, _ = _matrix_products(map_or_matrix)
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    b = torch.randn(n, dtype=torch.float64, generator=generator)
    b = b / b.norm()
    max_iter = min(max_iter, n)
    target_eps = 1.0 - 1.0 / (1.0 + rtol) ** 2
    steps = _power_steps if method == "power" else _lanczos_steps
    theta, residual, eps, k = steps(gram, b, n, delta, max_iter, min_iter, target_eps)
    theta = max(theta, 0.0)
    # float64 round-off of the Ritz value (products, reorthogonalisation, eigvalsh): far below this margin
    theta_up = (theta + residual) * (1.0 + ROUNDOFF_MARGIN)
    if eps >= 1.0:
        value = math.inf
    else:
        value = math.sqrt(theta_up / (1.0 - eps))
    return NormValue(
        value, Guarantee.PROBABILISTIC_UPPER, f"krylov_random_start_{method}", k, time.perf_counter() - start,
        {
            "failure_probability": float(delta), "relative_eps": float(eps),
            "ritz_value": math.sqrt(theta), "krylov_dim": int(k), "n": int(n),
            "note": "P(true norm > value) <= failure_probability over the random start",
        },
    )
