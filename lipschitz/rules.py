"""Lipschitz constants of the parameter-free pieces of a network (l2 norm, eval mode).

Pure functions: activation slopes (computed by numerically maximising the derivative), exact pooling
constants (built from the pooling windows at the real input size), input normalisation and the
per-channel scale of an eval-mode batch norm. Proofs: docs/network-bounds.md.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from spectral.guarantee import Guarantee, NormValue

# Relative safety margin added to numerically maximised slopes so the value stays a certificate.
SLOPE_SAFETY = 1e-9
# Relative margin on the float64 SVD of the small 1-D averaging matrices (backward error ~ n * 2^-53), so an
# average-pooling constant is never below the exact one by round-off.
POOL_SVD_ROUNDOFF = 2.0**-40


def _silu_slope(x: float) -> float:
    s = 1.0 / (1.0 + math.exp(-x))
    return s * (1.0 + x * (1.0 - s))


def _gelu_erf_slope(x: float) -> float:
    cdf = 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
    pdf = math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return cdf + x * pdf


def _gelu_tanh_slope(x: float) -> float:
    c = math.sqrt(2.0 / math.pi)
    u = c * (x + 0.044715 * x**3)
    t = math.tanh(u)
    du = c * (1.0 + 3 * 0.044715 * x * x)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du


def _maximise_abs_slope(slope, lo: float = -20.0, hi: float = 20.0) -> tuple[float, float]:
    """Maximise |slope(x)| over [lo, hi]: dense grid, then bounded Brent refinement around the best point.

    Outside [-20, 20] the smooth activations used here have slopes within 1e-8 of 0 or 1, so the
    interval holds the global maximum; the value is returned with a relative safety margin.
    """
    from scipy.optimize import minimize_scalar

    n = 40001
    grid = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    vals = [abs(slope(x)) for x in grid]
    i = max(range(n), key=vals.__getitem__)
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, n - 1)]
    res = minimize_scalar(lambda x: -abs(slope(x)), bounds=(a, b), method="bounded",
                          options={"xatol": 1e-12})
    best_x, best = (float(res.x), float(-res.fun)) if -res.fun >= vals[i] else (grid[i], vals[i])
    return best_x, best


@lru_cache(maxsize=None)
def _smooth_slope(kind: str, approximate: str = "none", beta: float = 1.0) -> tuple[float, float]:
    if kind == "silu":
        return _maximise_abs_slope(_silu_slope)
    if kind == "gelu":
        return _maximise_abs_slope(_gelu_tanh_slope if approximate == "tanh" else _gelu_erf_slope)
    if kind == "softplus":
        # d/dx softplus_beta(x) = sigmoid(beta x): the beta-scaled softplus is 1-Lipschitz for any beta > 0.
        return _maximise_abs_slope(lambda x: 1.0 / (1.0 + math.exp(-max(min(beta * x, 700.0), -700.0))))
    if kind == "tanh":
        return _maximise_abs_slope(lambda x: 1.0 - math.tanh(x) ** 2)
    raise ValueError(f"no smooth slope rule for {kind!r}")


def activation_slope(kind: str, params: dict | None = None) -> NormValue:
    """Lipschitz constant sup|sigma'| of an elementwise activation (l2 and any lp norm alike).

    kind in lipschitz.graph.ACTIVATION_KINDS; params: {"negative_slope": a} for leaky_relu,
    {"approximate": "tanh"} for gelu, {"beta": b} for softplus.
    """
    params = dict(params or {})
    if kind in ("relu", "identity"):
        return NormValue(1.0, Guarantee.EXACT, f"slope:{kind}")
    if kind == "leaky_relu":
        a = float(params.get("negative_slope", 0.01))
        return NormValue(max(1.0, abs(a)), Guarantee.EXACT, "slope:leaky_relu", details={"negative_slope": a})
    if kind in ("silu", "gelu", "softplus", "tanh"):
        approximate = str(params.get("approximate", "none"))
        beta = float(params.get("beta", 1.0))
        if kind == "softplus" and beta <= 0:
            raise ValueError(f"softplus beta must be > 0, got {beta}")
        x, v = _smooth_slope(kind, approximate, beta)
        guarantee = Guarantee.EXACT if kind in ("softplus", "tanh") else Guarantee.UPPER
        value = 1.0 if kind in ("softplus", "tanh") else v * (1.0 + SLOPE_SAFETY)
        return NormValue(value, guarantee, f"slope:{kind}",
                         details={"argmax": x, "numerical_max": v, "approximate": approximate, "beta": beta})
    raise ValueError(f"unknown activation {kind!r}; supported: relu, leaky_relu, silu, gelu, softplus, tanh, identity")


@lru_cache(maxsize=None)
def _smooth_slope_min(kind: str, approximate: str = "none") -> float:
    """min sigma' of SiLU / GELU (negative; grid + bounded Brent on the negated slope)."""
    fn = {"silu": _silu_slope, "gelu": _gelu_tanh_slope if approximate == "tanh" else _gelu_erf_slope}[kind]
    shifted = lambda x: 2.0 - fn(x)  # noqa: E731  (positive, maximised where fn is smallest)
    _, best = _maximise_abs_slope(shifted)
    return 2.0 - best


def activation_slope_range(kind: str, params: dict | None = None) -> tuple[float, float]:
    """(alpha, beta) with alpha <= (sigma(a) - sigma(b)) / (a - b) <= beta for all a != b (slope restriction).

    Exact for ReLU (0, 1), LeakyReLU(s) (min(s, 1), max(s, 1)), tanh and softplus (0, 1), identity (1, 1);
    SiLU/GELU from the numerically maximised and minimised derivative with a 1e-9 margin outward
    (mean value theorem: a difference quotient is a derivative at an intermediate point).
    """
    params = dict(params or {})
    if kind == "relu":
        return 0.0, 1.0
    if kind == "identity":
        return 1.0, 1.0
    if kind == "leaky_relu":
        s = float(params.get("negative_slope", 0.01))
        return min(s, 1.0), max(s, 1.0)
    if kind in ("tanh", "softplus"):
        if kind == "softplus" and float(params.get("beta", 1.0)) <= 0:
            raise ValueError(f"softplus beta must be > 0, got {params.get('beta')}")
        return 0.0, 1.0
    if kind in ("silu", "gelu"):
        approximate = str(params.get("approximate", "none"))
        hi = activation_slope(kind, params).value
        lo = _smooth_slope_min(kind, approximate)
        return lo - SLOPE_SAFETY * max(1.0, abs(lo)), hi
    raise ValueError(f"unknown activation {kind!r}; supported: relu, leaky_relu, silu, gelu, softplus, tanh, identity")


def activation_from_module(module: nn.Module) -> tuple[str, dict] | None:
    """(kind, params) for a torch activation module, or None if it is not one."""
    if isinstance(module, nn.ReLU):
        return "relu", {}
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", {"negative_slope": module.negative_slope}
    if isinstance(module, nn.SiLU):
        return "silu", {}
    if isinstance(module, nn.GELU):
        return "gelu", {"approximate": module.approximate}
    if isinstance(module, nn.Softplus):
        return "softplus", {"beta": float(module.beta)}
    if isinstance(module, nn.Tanh):
        return "tanh", {}
    return None


def absolute_value_split(kind: str, params: dict | None = None) -> tuple[float, float] | None:
    """(a, b) with sigma(z) = a*z + b*|z| for piecewise-linear activations (LipLT split), else None.

    ReLU: z/2 + |z|/2; LeakyReLU(s) with 0 <= s <= 1: (1+s)/2 z + (1-s)/2 |z|.
    """
    params = params or {}
    if kind == "relu":
        return 0.5, 0.5
    if kind == "leaky_relu":
        s = float(params.get("negative_slope", 0.01))
        if 0.0 <= s <= 1.0:
            return (1.0 + s) / 2.0, (1.0 - s) / 2.0
    return None


# ----------------------------------------------------------------------------------------- pooling

def _pair(v, n: int) -> tuple:
    if isinstance(v, (tuple, list)):
        if len(v) != n:
            raise ValueError(f"expected {n} values, got {v!r}")
        return tuple(v)
    return (v,) * n


def _pool_windows_1d(size: int, out: int, kernel: int, stride: int, padding: int, dilation: int) -> list[list[int]]:
    windows = []
    for o in range(out):
        start = o * stride - padding
        windows.append([start + dilation * t for t in range(kernel) if 0 <= start + dilation * t < size])
    return windows


def _adaptive_windows_1d(size: int, out: int) -> list[list[int]]:
    return [list(range((o * size) // out, -((-(o + 1) * size) // out))) for o in range(out)]


def _avg_matrix_1d(size: int, module: nn.Module, dim: int, nd: int) -> torch.Tensor:
    """The exact 1-D averaging matrix of one spatial axis (2-D avg pooling is the Kronecker product)."""
    eye = torch.eye(size, dtype=torch.float64).reshape(size, 1, size)
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        out = _pair(module.output_size, nd)[dim]
        out = size if out is None else out
        return F.adaptive_avg_pool1d(eye, out).reshape(size, -1).T
    k = _pair(module.kernel_size, nd)[dim]
    s = _pair(module.stride if module.stride is not None else module.kernel_size, nd)[dim]
    p = _pair(module.padding, nd)[dim]
    return F.avg_pool1d(eye, k, s, p, ceil_mode=module.ceil_mode,
                        count_include_pad=module.count_include_pad).reshape(size, -1).T


def pool_lipschitz(module: nn.Module, in_shape: Sequence[int]) -> NormValue:
    """Exact l2 Lipschitz constant of a pooling module at input shape (C, H, W) or (C, L).

    Average pooling is linear and separable: its norm is the product of the spectral norms of the 1-D
    averaging matrices (exact for any kernel/stride/padding/ceil mode). Max pooling has constant
    sqrt(max number of windows covering one input pixel) (exact; 1 when windows do not overlap).
    """
    in_shape = tuple(int(s) for s in in_shape)
    nd = len(in_shape) - 1
    if nd not in (1, 2):
        raise ValueError(f"pooling input shape must be (C, L) or (C, H, W), got {in_shape}")
    spatial = in_shape[1:]
    avg_types = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
    if isinstance(module, avg_types):
        if getattr(module, "divisor_override", None):
            raise ValueError("AvgPool2d with divisor_override is not supported; remove divisor_override")
        norm = 1.0
        for d, size in enumerate(spatial):
            norm *= float(torch.linalg.matrix_norm(_avg_matrix_1d(size, module, d, nd), ord=2))
        norm *= 1.0 + POOL_SVD_ROUNDOFF
        return NormValue(norm, Guarantee.EXACT, f"pool:{type(module).__name__}",
                         details={"in_shape": list(in_shape)})
    max_types = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
    if isinstance(module, max_types):
        coverage = 1
        with torch.no_grad():
            out_shape = module(torch.zeros((1,) + in_shape)).shape[2:]
        for d, size in enumerate(spatial):
            if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)):
                windows = _adaptive_windows_1d(size, out_shape[d])
            else:
                k = _pair(module.kernel_size, nd)[d]
                s = _pair(module.stride if module.stride is not None else module.kernel_size, nd)[d]
                windows = _pool_windows_1d(size, out_shape[d], k, s, _pair(module.padding, nd)[d],
                                           _pair(module.dilation, nd)[d])
            counts = [0] * size
            for w in windows:
                for i in w:
                    counts[i] += 1
            coverage *= max(counts)
        return NormValue(math.sqrt(coverage), Guarantee.EXACT, f"pool:{type(module).__name__}",
                         details={"max_windows_per_pixel": coverage, "in_shape": list(in_shape)})
    raise ValueError(f"unsupported pooling module {type(module).__name__}; supported: "
                     "AvgPool1d/2d, AdaptiveAvgPool1d/2d, MaxPool1d/2d, AdaptiveMaxPool1d/2d")


def pool_is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d))


# ---------------------------------------------------------------------------------- affine pieces

def batchnorm_scale(module: nn.Module) -> torch.Tensor:
    """Per-channel eval-mode scale gamma / sqrt(running_var + eps) (signed), computed in float64.

    The float32 parameters of a float32 model convert to float64 exactly, so the scale is that of the stored
    network up to float64 round-off (a float32 computation was up to ~1e-7 relative below it).
    """
    from spectral.folding import fold_scale

    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"expected a BatchNorm module, got {type(module).__name__}")
    if module.training and module.track_running_stats:
        raise ValueError("BatchNorm is in training mode; call model.eval() before computing a bound")
    if module.running_var is None:
        raise ValueError("BatchNorm without running statistics has no fixed eval-mode map; "
                         "use track_running_stats=True")
    return fold_scale(module)


def normalize_scale(std: torch.Tensor) -> torch.Tensor:
    """Per-channel scale 1/std (float64) of the input normalisation (x - mean) / std."""
    std = torch.as_tensor(std).detach().flatten().to(torch.float64)
    if (std <= 0).any():
        raise ValueError(f"normalisation std must be positive, got {std.tolist()}")
    return 1.0 / std
