"""Random-matrix predictions for the spectral norms of Gaussian matrices and convolution kernels.

Every function returns numbers with an explicit guarantee label (``spectral.guarantee``):

- ``gordon_expected_norm_bound``: ``UPPER`` -- a certified bound on the *expectation* E[s_max] (not on one draw).
- ``gaussian_norm_high_probability``: ``PROBABILISTIC_UPPER`` -- bounds one draw with failure probability delta.
- ``gaussian_norm_tracy_widom`` / ``conv_norm_prediction``: ``ESTIMATE`` -- sharper expected values, no guarantee.

References: Gordon 1985 / Davidson & Szarek 2001 (E s_max <= sqrt(N)+sqrt(n) and Gaussian concentration);
Johnstone 2001 (finite-size Tracy-Widom centring/scaling of the largest Wishart eigenvalue); Johansson 2000
(complex case); Chiani 2014 (shifted-gamma approximation of the Tracy-Widom laws); Sedghi et al. 2019
(circular convolutions are block-diagonal in the Fourier basis).
"""
from __future__ import annotations

import math
from functools import lru_cache

from spectral.guarantee import Guarantee, NormValue

# Tracy-Widom moments (beta=1: real, beta=2: complex).
TW_MEAN = {1: -1.2065335745820, 2: -1.7710868074}
TW_VAR = {1: 1.6077810345, 2: 0.8131947928}
# Chiani 2014: TW_beta ~ Gamma(shape, scale) - shift (matches mean, variance and skewness).
_TW_GAMMA = {1: (46.446, 0.186054, 9.84801), 2: (79.6595, 0.101037, 9.81961)}

INITS = ("kaiming_normal_fan_in", "kaiming_normal_fan_out", "pytorch_default", "fixed")
FIELDS = {"real": 1, "complex": 2}


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_std(std: float) -> None:
    if not (isinstance(std, (int, float)) and math.isfinite(std) and std > 0):
        raise ValueError(f"std must be a positive finite number, got {std!r}")


# ---------------------------------------------------------------- Gaussian matrices
def gordon_expected_norm_bound(rows: int, cols: int, std: float = 1.0) -> NormValue:
    """Gordon's inequality E[s_max(G)] <= std*(sqrt(rows)+sqrt(cols)) for G with iid N(0, std^2) entries.

    The value certifies an upper bound on the EXPECTED largest singular value, not on a single draw.
    References: Gordon 1985; Davidson & Szarek 2001, Theorem II.13.
    """
    _check_dims(rows=rows, cols=cols)
    _check_std(std)
    value = std * (math.sqrt(rows) + math.sqrt(cols))
    return NormValue(value, Guarantee.UPPER, "gordon", details={
        "bounds": "E[s_max] of a rows x cols matrix with iid N(0, std^2) entries (an expectation, not one draw)",
        "rows": rows, "cols": cols, "std": std})


def gaussian_tail_bound(t: float) -> float:
    """P(s_max > std*(sqrt(N)+sqrt(n)+t)) <= exp(-t^2/2) for t >= 0 (Gaussian concentration, s_max is 1-Lipschitz).

    References: Davidson & Szarek 2001, Theorem II.13 (with Gordon's expectation bound).
    """
    if not (math.isfinite(t) and t >= 0):
        raise ValueError(f"t must be a finite number >= 0, got {t!r}")
    return math.exp(-t * t / 2.0)


def gaussian_norm_high_probability(rows: int, cols: int, std: float = 1.0, delta: float = 1e-3) -> NormValue:
    """Bound std*(sqrt(rows)+sqrt(cols)+sqrt(2 log(1/delta))) on s_max of ONE draw, failing with prob <= delta.

    References: Davidson & Szarek 2001, Theorem II.13.
    """
    _check_dims(rows=rows, cols=cols)
    _check_std(std)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    t = math.sqrt(2.0 * math.log(1.0 / delta))
    value = std * (math.sqrt(rows) + math.sqrt(cols) + t)
    return NormValue(value, Guarantee.PROBABILISTIC_UPPER, "gordon+concentration",
                     details={"failure_probability": delta, "t": t, "rows": rows, "cols": cols, "std": std})


def _tw_gamma(beta: int):
    from scipy import stats

    shape, scale, shift = _TW_GAMMA[beta]
    return stats.gamma(shape, scale=scale, loc=-shift)


def wishart_edge_parameters(rows: int, cols: int, field: str = "real") -> tuple[float, float]:
    """(mu, sigma) with (lambda_max(G^T G) - mu)/sigma ~ TW_beta for G with iid unit-variance entries.

    Real: Johnstone 2001 centring (sqrt(n-1)+sqrt(p))^2 with n the larger dimension; complex: Johansson 2000
    with (sqrt(n)+sqrt(p))^2. References: Johnstone 2001, Ann. Statist. 29(2); Johansson 2000.
    """
    _check_dims(rows=rows, cols=cols)
    beta = _beta(field)
    n, p = max(rows, cols), min(rows, cols)
    n_eff = n - 1 if (beta == 1 and n > 1) else n
    a, b = math.sqrt(n_eff), math.sqrt(p)
    return (a + b) ** 2, (a + b) * (1.0 / a + 1.0 / b) ** (1.0 / 3.0)


def _beta(field: str) -> int:
    if field not in FIELDS:
        raise ValueError(f"unknown field {field!r}; valid: {', '.join(FIELDS)}")
    return FIELDS[field]


@lru_cache(maxsize=4096)
def _expected_sqrt_edge(mu: float, sigma: float, n_max: int, beta: int) -> float:
    """E[sqrt(max(mu + sigma*T, 0))] with T the max of n_max iid TW_beta (shifted-gamma approximation)."""
    from scipy import integrate

    dist = _tw_gamma(beta)
    lo, hi = dist.ppf(1e-13), dist.isf(1e-15)
    grid_lo = dist.ppf(0.5 ** (1.0 / n_max)) if n_max > 1 else dist.mean()

    def integrand(x: float) -> float:
        density = n_max * dist.cdf(x) ** (n_max - 1) * dist.pdf(x)
        return math.sqrt(max(mu + sigma * x, 0.0)) * density

    value, _ = integrate.quad(integrand, lo, hi, points=[grid_lo], limit=400)
    return value


def expected_max_tracy_widom(n_max: int = 1, field: str = "real") -> float:
    """E[max of n_max iid TW_beta] (shifted-gamma approximation; n_max=1 gives E[TW]).

    References: Chiani 2014, J. Multivariate Anal. 129.
    """
    _check_dims(n_max=n_max)
    from scipy import integrate

    dist = _tw_gamma(_beta(field))
    lo, hi = dist.ppf(1e-13), dist.isf(1e-15)
    value, _ = integrate.quad(lambda x: x * n_max * dist.cdf(x) ** (n_max - 1) * dist.pdf(x), lo, hi, limit=400)
    return value


def gaussian_norm_tracy_widom(rows: int, cols: int, std: float = 1.0, field: str = "real",
                              n_max: int = 1) -> NormValue:
    """Expected s_max of a rows x cols Gaussian matrix with Tracy-Widom finite-size correction (ESTIMATE).

    ``field="complex"`` means E|entry|^2 = std^2. With ``n_max > 1`` the value is the expected maximum of
    ``n_max`` independent such matrices (the extreme-value correction used for convolutions).
    References: Johnstone 2001; Johansson 2000; Chiani 2014.
    """
    _check_dims(rows=rows, cols=cols, n_max=n_max)
    _check_std(std)
    mu, sigma = wishart_edge_parameters(rows, cols, field)
    value = std * _expected_sqrt_edge(mu, sigma, n_max, _beta(field))
    return NormValue(value, Guarantee.ESTIMATE, "tracy_widom", details={
        "rows": rows, "cols": cols, "std": std, "field": field, "n_max": n_max, "mu": mu, "sigma": sigma,
        "leading_order": std * (math.sqrt(rows) + math.sqrt(cols))})


# ---------------------------------------------------------------- convolutions
def effective_frequency_count(c_out: int, c_in: int, kernel_size: int, input_size: int | None,
                              stride: int = 1) -> int:
    """Number of effectively independent per-frequency symbol matrices whose maximum is the operator norm.

    Symbols at two frequencies decorrelate over a distance ~2*pi/k (Dirichlet kernel), and their top singular
    values decorrelate faster, by a factor ~c^(1/6) per axis (edge fluctuations live on the N^(-2/3) scale).
    Heuristic (calibrated by Monte Carlo, see docs/theory.md): min(distinct grid frequencies, 2 k^2 c^(1/3)),
    c = min(c_out, c_in); 1 for k = 1 (every frequency sees the same matrix).
    """
    _check_dims(c_out=c_out, c_in=c_in, kernel_size=kernel_size, stride=stride)
    if kernel_size == 1:
        return 1
    continuous = 2.0 * kernel_size ** 2 * min(c_out, c_in) ** (1.0 / 3.0)
    if input_size is None:
        return max(1, int(round(continuous)))
    side = max(1, input_size // stride)
    self_conjugate = (2 if side % 2 == 0 else 1) ** 2  # frequencies w with w = -w (mod 2 pi): real symbols
    distinct = (side * side + self_conjugate) // 2
    return max(1, int(round(min(distinct, continuous))))


def generalized_mp_edge(rows: int, variances) -> float:
    """Largest singular value (to leading order) of Z diag(v)^(1/2), Z a rows x p matrix of iid unit Gaussians.

    Right edge of the generalised Marchenko-Pastur law: s_max^2 ~ rows * min_{m in (-1/max v, 0)} z(m),
    z(m) = -1/m + (1/rows) sum_j v_j / (1 + v_j m). With all v_j = s^2 it reduces to s(sqrt(rows)+sqrt(p)).
    References: Silverstein & Choi 1995 (support of the limiting spectral distribution).
    """
    import numpy as np
    from scipy.optimize import minimize_scalar

    _check_dims(rows=rows)
    v = np.asarray(variances, dtype=float)
    if v.ndim != 1 or v.size == 0 or np.any(v < 0) or not np.all(np.isfinite(v)):
        raise ValueError("variances must be a non-empty 1-D array of finite non-negative numbers")
    v = v[v > 0]
    if v.size == 0:
        return 0.0
    t_max = float(v.max())

    def z(m: float) -> float:
        return -1.0 / m + float(np.sum(v / (1.0 + v * m))) / rows

    lo, hi = -1.0 / t_max, 0.0
    span = hi - lo
    res = minimize_scalar(z, bounds=(lo + 1e-12 * span, hi - 1e-12 * span), method="bounded",
                          options={"xatol": 1e-12 * span})
    return math.sqrt(rows * res.fun)


def _stride_alias_variances(kernel_size: int, stride: int) -> list[float]:
    """Eigenvalues of the 2-D alias Gram (Phi^H Phi)/s^2 of a k-tap kernel under stride s (frequency-free)."""
    import numpy as np

    a = np.arange(kernel_size)[:, None]
    j = np.arange(stride)[None, :]
    phi = np.exp(-2j * np.pi * a * j / stride)  # k x s, one axis
    ev = np.clip(np.linalg.eigvalsh(phi.conj().T @ phi).real, 0, None)
    return [float(x * y) / stride ** 2 for x in ev for y in ev]


def conv_norm_leading_order(c_out: int, c_in: int, kernel_size: int, std: float, stride: int = 1) -> float:
    """Leading-order law for a circular k x k convolution with iid N(0, std^2) entries.

    Stride 1: std*k*(sqrt(c_in)+sqrt(c_out)) (each frequency's c_out x c_in symbol has entry variance std^2 k^2).
    Stride s: the polyphase symbol is std * Z (Phi kron I_cin)/s with Phi the k x s alias phases per axis, a
    Gaussian matrix with a fixed column covariance; its edge is the generalised Marchenko-Pastur edge.
    """
    _check_dims(c_out=c_out, c_in=c_in, kernel_size=kernel_size, stride=stride)
    _check_std(std)
    if stride == 1:
        return std * kernel_size * (math.sqrt(c_out) + math.sqrt(c_in))
    variances = [v for v in _stride_alias_variances(kernel_size, stride) for _ in range(c_in)]
    return std * generalized_mp_edge(c_out, variances)


def conv_norm_prediction(c_out: int, c_in: int, kernel_size: int, std: float, input_size: int | None = None,
                         stride: int = 1, correction: str = "tracy_widom") -> NormValue:
    """Predicted operator norm of a circular k x k convolution with iid N(0, std^2) kernel entries (ESTIMATE).

    ``correction``: "none" (leading order std*k*(sqrt(c_in)+sqrt(c_out))) or "tracy_widom" (finite-size TW mean of
    the per-frequency symbol, maximised over ``effective_frequency_count`` independent frequencies).
    References: Sedghi et al. 2019; Johansson 2000; Johnstone 2001; Chiani 2014.
    """
    _check_dims(c_out=c_out, c_in=c_in, kernel_size=kernel_size, stride=stride)
    _check_std(std)
    if input_size is not None:
        _check_dims(input_size=input_size)
    corrections = ("none", "tracy_widom")
    if correction not in corrections:
        raise ValueError(f"unknown correction {correction!r}; valid: {', '.join(corrections)}")
    leading = conv_norm_leading_order(c_out, c_in, kernel_size, std, stride)
    details = {"c_out": c_out, "c_in": c_in, "kernel_size": kernel_size, "std": std, "stride": stride,
               "input_size": input_size, "leading_order": leading}
    if correction == "none":
        return NormValue(leading, Guarantee.ESTIMATE, "rmt_leading_order", details=details)
    r = min(kernel_size, stride)
    field = "real" if kernel_size == 1 else "complex"
    n_max = effective_frequency_count(c_out, c_in * r * r, kernel_size, input_size, stride)
    # Finite-size/max correction of an iid c_out x (r^2 c_in) symbol, applied as a ratio to the leading order.
    equiv = gaussian_norm_tracy_widom(c_out, c_in * r * r, 1.0, field=field, n_max=n_max)
    ratio = equiv.value / equiv.details["leading_order"]
    details.update(n_max=n_max, field=field, tw_ratio=ratio)
    return NormValue(leading * ratio, Guarantee.ESTIMATE, "rmt_tracy_widom_max", details=details)


def init_std(init: str, c_out: int, c_in: int, kernel_size: int = 1, std: float | None = None) -> float:
    """Entry standard deviation of a common initialisation (fan_in = c_in k^2, fan_out = c_out k^2).

    kaiming_normal_fan_in: sqrt(2/fan_in); kaiming_normal_fan_out: sqrt(2/fan_out); pytorch_default
    (kaiming_uniform_ with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in); fixed: ``std``.
    References: He et al. 2015.
    """
    _check_dims(c_out=c_out, c_in=c_in, kernel_size=kernel_size)
    fan_in, fan_out = c_in * kernel_size ** 2, c_out * kernel_size ** 2
    if init == "kaiming_normal_fan_in":
        return math.sqrt(2.0 / fan_in)
    if init == "kaiming_normal_fan_out":
        return math.sqrt(2.0 / fan_out)
    if init == "pytorch_default":
        return math.sqrt(1.0 / (3.0 * fan_in))
    if init == "fixed":
        if std is None:
            raise ValueError("init='fixed' needs std=<entry standard deviation>")
        _check_std(std)
        return float(std)
    raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")


def init_norm_constant(init: str, c_out: int, c_in: int, std: float | None = None, kernel_size: int = 3) -> float:
    """Leading-order stride-1 norm at an initialisation; width-independent except for ``fixed``.

    fan_in: sqrt(2)(1+sqrt(c_out/c_in)); fan_out: sqrt(2)(1+sqrt(c_in/c_out)); pytorch_default:
    (1+sqrt(c_out/c_in))/sqrt(3); fixed: std*k*(sqrt(c_in)+sqrt(c_out)) (grows like sqrt(width)).
    """
    s = init_std(init, c_out, c_in, kernel_size, std)
    return conv_norm_leading_order(c_out, c_in, kernel_size, s)


def sample_init(init: str, c_out: int, c_in: int, kernel_size: int, *, std: float | None = None,
                generator=None, dtype=None):
    """Draw a c_out x c_in x k x k kernel from an initialisation (for Monte Carlo checks)."""
    import torch

    dtype = dtype or torch.float64
    s = init_std(init, c_out, c_in, kernel_size, std)
    shape = (c_out, c_in, kernel_size, kernel_size)
    if init == "pytorch_default":
        bound = s * math.sqrt(3.0)
        return (torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1) * bound
    return torch.randn(shape, generator=generator, dtype=dtype) * s
