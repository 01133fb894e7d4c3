"""Sandwich one layer's operator norm between a certified lower and a certified upper bound.

``sandwich(layer_or_weight, input_shape, rtol=0.02)`` picks methods from an up-front size/cost estimate:

- linear layers: exact SVD of the weight;
- circular padding that maps the ``n`` grid onto itself (``n % stride == 0``): the layer *is* a circular
  convolution; exact FFT spectrum when cheap, else the Fourier certificate below (then a bound on the layer);
- small operators: exact dense SVD;
- zero padding: the layer is a compression (submatrix) of the circular convolution on the grid of
  ``spectral.upper.zero_padding_grid`` (``n + p`` for "same" convs; a multiple of the stride), so any bound
  on that circular operator bounds the layer;
- reflect/replicate padding (and circular padding of other sizes): ``conv_valid o pad``: circular-grid
  bound times ``||pad||`` (exact: ``sqrt(max copies of one pixel)``);
- when the certificate's estimated time exceeds the budget: a cheap bound from ``spectral.upper``.

The Fourier certificate ("fft_cholesky"): each frequency block ``B(u)`` of the circular operator gives a
Hermitian ``H(u) = B B^H`` (or ``B^H B``, the smaller side), assembled cheaply from the kernel's tap
autocorrelations; ``||B(u)||^2 <= mu`` iff ``mu I - H(u)`` is positive semi-definite, which a Cholesky
factorisation certifies at ``r^3/3`` per block (cheaper than an SVD or Gram iteration). ``mu`` comes from
power-iteration estimates on a sample of blocks, inflated by ``(1 + rtol/4)^2``; blocks that fail get their
own estimate and are re-certified. A rigorous floating-point margin (Cholesky backward error
``gamma_{4(n+1)} tr(mu I - H)`` plus the error of forming ``H``) is added: negligible in float64, large in
float32 (which is therefore not the default).

The lower bound is a Rayleigh quotient of the true layer (Lanczos or power iteration from ``spectral.lower``),
warm-started from the plane wave of the top frequency block and refined (warm) while the gap exceeds ``rtol``
and it still improves. For zero padding at small spatial sizes the circulant bound itself sits a few percent
above the true norm (e.g. 8x8 inputs): the reported gap then exceeds ``rtol`` honestly.

References: Sedghi, Gupta & Long (2019) (FFT block-diagonalisation); Senderovich et al. (2022) (polyphase
strides); Demmel (1989) / Higham, "Accuracy and Stability of Numerical Algorithms", Thm 10.3 (Cholesky backward
error, used for the floating-point margin); Golub & Van Loan (Lanczos).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from spectral.guarantee import Guarantee, NormValue, json_safe
from spectral.circulant import _FourierGram, fourier_certificate, plane_wave  # noqa: F401  (re-exported)
from spectral.upper import zero_padding_grid

__all__ = ["Sandwich", "sandwich", "fourier_certificate", "padding_operator_norm", "circular_grid"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d)


# ----------------------------------------------------------------------------------------------- results
def norm_value_dict(nv: NormValue | None) -> dict[str, Any] | None:
    """JSON-friendly dict of a NormValue (warm-start vectors left out), None for None."""
    return None if nv is None else nv.to_dict()


@dataclass
class Sandwich:
    """``lower <= ||layer|| <= upper`` with how each side was obtained.

    ``exact`` is set when the norm is known exactly (then lower, upper and exact are the same value).
    ``probabilistic_upper`` (optional) holds with probability ``1 - details["failure_probability"]``.
    """

    lower: NormValue
    upper: NormValue
    exact: NormValue | None = None
    probabilistic_upper: NormValue | None = None
    rtol: float = 0.02
    seconds: float = 0.0
    steps: list[dict[str, Any]] = field(default_factory=list)
    layer: dict[str, Any] = field(default_factory=dict)

    @property
    def gap(self) -> float:
        """``upper / lower - 1`` (0 when exact; inf when the lower bound is 0 but the upper is not)."""
        if self.exact is not None:
            return 0.0
        if self.lower.value <= 0:
            return 0.0 if self.upper.value <= 0 else math.inf
        return max(self.upper.value / self.lower.value - 1.0, 0.0)

    @property
    def converged(self) -> bool:
        return self.gap <= self.rtol

    @property
    def methods(self) -> list[dict[str, str]]:
        """The methods behind each reported side, with their guarantee labels."""
        out = [
            {"role": "lower", "method": self.lower.method, "guarantee": self.lower.guarantee.value},
            {"role": "upper", "method": self.upper.method, "guarantee": self.upper.guarantee.value},
        ]
        if self.exact is not None:
            out.append({"role": "exact", "method": self.exact.method, "guarantee": self.exact.guarantee.value})
        if self.probabilistic_upper is not None:
            p = self.probabilistic_upper
            out.append({"role": "probabilistic_upper", "method": p.method, "guarantee": p.guarantee.value})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "lower": norm_value_dict(self.lower),
            "upper": norm_value_dict(self.upper),
            "exact": norm_value_dict(self.exact),
            "probabilistic_upper": norm_value_dict(self.probabilistic_upper),
            "gap": json_safe(self.gap),
            "rtol": self.rtol,
            "converged": self.converged,
            "seconds": self.seconds,
            "methods": self.methods,
            "steps": json_safe(self.steps),
            "layer": json_safe(self.layer),
        }


# ----------------------------------------------------------------------------------------------- helpers
def circular_grid(
    spatial: Sequence[int], padding: Sequence[tuple[int, int]], stride: Sequence[int]
) -> tuple[int, ...]:
    """Smallest circular grid ``m >= n + p_l + p_r`` divisible by the stride (per spatial dim)."""
    out = []
    for n, (pl, pr), s in zip(spatial, padding, stride):
        total = n + pl + pr
        out.append(int(math.ceil(total / s) * s))
    return tuple(out)


def certificate_grid(op: Any) -> tuple[int, ...]:
    """The circular grid whose convolution contains ``op`` as a submatrix (times ``||P||`` for copy padding).

    Zero padding: the smallest grid proved sufficient in ``spectral.upper.zero_padding_grid`` (``n + p`` for
    "same" 3x3 convs, one row/column less than ``n + 2p``, so fewer Fourier blocks). Copy padding (reflect,
    replicate, circular with a size the stride does not divide): the padded size, see ``circular_grid``.
    """
    spatial = op.in_shape[1:]
    if op.padding_mode != "zeros":
        return circular_grid(spatial, op.padding, op.stride)
    kernel = op.weight.shape[2:]
    return tuple(zero_padding_grid(n, k, s, d, pl, pr)
                 for n, k, s, d, (pl, pr) in zip(spatial, kernel, op.stride, op.dilation, op.padding))


def padding_operator_norm(in_shape: Sequence[int], padding: Sequence[tuple[int, int]], mode: str) -> float:
    """Exact norm of a padding map ``x -> pad(x)`` (``(C, *spatial)`` input): the padding is a Kronecker
    product over spatial dims, so its norm is the product of the 1-d norms (``spectral.upper.padding_map_norm``)."""
    from spectral.upper import padding_map_norm

    return math.prod(padding_map_norm(n, pl, pr, mode) for n, (pl, pr) in zip(in_shape[1:], padding))


def _as_operator(
    layer_or_weight: Any,
    input_shape: Sequence[int],
    stride: Any,
    padding: Any,
    padding_mode: str,
    dilation: Any,
    groups: int,
) -> Any:
    from spectral.operators import LayerOperator

    if isinstance(layer_or_weight, nn.Module):
        if isinstance(layer_or_weight, (nn.Linear, *_CONV_TYPES)):
            return LayerOperator.from_module(layer_or_weight, input_shape)
        raise TypeError(
            f"sandwich takes nn.Conv1d, nn.Conv2d, nn.Linear or a weight tensor, got {type(layer_or_weight).__name__}"
        )
    if not torch.is_tensor(layer_or_weight):
        raise TypeError(f"sandwich takes a layer module or a weight tensor, got {type(layer_or_weight).__name__}")
    weight = layer_or_weight
    if weight.dim() == 2:
        return LayerOperator.linear(weight, input_shape)
    return LayerOperator.conv(weight, input_shape, stride, padding, dilation, groups, padding_mode)


def _with_weight(op: Any, weight: torch.Tensor) -> Any:
    """The same layer operator with another weight tensor (e.g. a float64 copy, or a BN-folded kernel)."""
    from spectral.operators import LayerOperator

    return LayerOperator(op.kind, weight, op.in_shape, op.out_shape, op.stride, op.padding, op.dilation,
                         op.groups, op.padding_mode)


def _exact(op: Any, value: float, method: str, seconds: float, details: dict[str, Any]) -> NormValue:
    return NormValue(float(value), Guarantee.EXACT, method, None, seconds, details)


def _plan_cost(op: Any) -> dict[str, Any]:
    """Up-front estimates (flops, bytes) of the candidate methods for a conv operator."""
    w = op.weight
    groups = op.groups
    c_out = w.shape[0] // groups
    c_side = w.shape[1] * math.prod(op.stride)
    r = min(c_out, c_side)
    taps = math.prod(w.shape[2:])
    grid = certificate_grid(op)
    freq_grid = [g // s for g, s in zip(grid, op.stride)]
    n_freq = math.prod(freq_grid[:-1]) * (freq_grid[-1] // 2 + 1) * groups
    cert_flops = n_freq * (8 * r * r * max(c_out, c_side) + 8 * r ** 3 / 3)
    svd_flops = n_freq * 8 * 4 * r * r * max(c_out, c_side)
    matvec_flops = 4 * w.numel() * math.prod(op.out_shape[1:])
    dense_entries = op.in_features * op.out_features
    return {
        "grid": list(grid), "frequencies": int(n_freq), "block": [int(c_out), int(c_side)],
        "certificate_flops": float(cert_flops), "fft_svd_flops": float(svd_flops),
        "lanczos_step_flops": float(matvec_flops), "dense_entries": int(dense_entries), "taps": int(taps),
    }


# ----------------------------------------------------------------------------------------------- main entry
def sandwich(
    layer_or_weight: Any,
    input_shape: Sequence[int],
    rtol: float = 0.02,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    padding_mode: str = "zeros",
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    budget_seconds: float = 120.0,
    max_memory_bytes: int = 2**30,
    dense_max_entries: int = 2**20,
    dense_max_flops: float = 5e9,
    fft_svd_max_flops: float = 5e10,
    lower_method: str = "lanczos",
    upper_method: str = "auto",
    assumed_flops_per_second: float = 2e10,
    lower_iters: int = 12,
    max_refine: int = 4,
    certificate_dtype: torch.dtype = torch.float64,
    probabilistic: bool = False,
    delta: float = 1e-3,
    seed: int = 0,
) -> Sandwich:
    """Certified ``lower <= ||layer||_2 <= upper`` for a conv1d/conv2d/linear layer at ``input_shape``.

    ``layer_or_weight`` is an ``nn.Conv1d/Conv2d/Linear`` (its own stride/padding/... are used) or a weight
    tensor with the conv parameters given here. ``input_shape`` excludes the batch: ``(C, H, W)``, ``(C, L)``
    or ``(F,)``. Refines until ``upper/lower - 1 <= rtol`` or ``budget_seconds``; ``max_memory_bytes`` bounds
    the Fourier blocks held at once. Method choice (recorded in ``layer["plan"]``): exact SVD for linear
    layers, exact FFT for "same" circular convs when ``fft_svd_max_flops`` allows, dense SVD when the
    operator is small (``dense_max_entries``/``dense_max_flops``), else ``upper_method``: "auto" takes the
    Fourier Cholesky certificate unless its estimated time (at ``assumed_flops_per_second``) exceeds the
    budget, then the cheap Singla-Feizi bound; any name in ``spectral.upper.UPPER_METHODS`` forces that
    bound. ``certificate_dtype`` float32 is faster but adds a larger (rigorous) round-off margin.
    ``probabilistic=True`` adds a Krylov upper bound that holds with probability ``1 - delta``.

    References: Sedghi et al. (2019); Senderovich et al. (2022); Higham (2002); Kuczynski & Wozniakowski (1992).
    """
    from spectral.exact import conv_operator_norm_circular, operator_norm_dense
    from spectral.lower import LOWER_METHODS, operator_norm_lower
    from spectral.upper import UPPER_METHODS, conv_operator_norm_upper

    if not rtol > 0:
        raise ValueError(f"rtol must be > 0 (relative gap upper/lower - 1), got {rtol!r}")
    valid_upper = ("auto", "fft_cholesky", *UPPER_METHODS)
    if upper_method not in valid_upper:
        raise ValueError(f"unknown upper_method {upper_method!r}; valid: {', '.join(valid_upper)}")
    if lower_method not in LOWER_METHODS:
        raise ValueError(f"unknown lower_method {lower_method!r}; valid: {', '.join(LOWER_METHODS)}")
    if budget_seconds <= 0 or max_memory_bytes <= 0:
        raise ValueError("budget_seconds and max_memory_bytes must be > 0")
    t0 = time.perf_counter()
    op = _as_operator(layer_or_weight, input_shape, stride, padding, padding_mode, dilation, groups)
    if not torch.isfinite(op.weight).all():
        raise ValueError("weight contains NaN or Inf; spectral norms need finite weights")
    layer = {
        "kind": op.kind, "weight_shape": list(op.weight.shape), "in_shape": list(op.in_shape),
        "out_shape": list(op.out_shape),
    }
    if op.kind != "linear":
        layer.update({
            "stride": list(op.stride), "padding": [list(p) for p in op.padding], "dilation": list(op.dilation),
            "groups": op.groups, "padding_mode": op.padding_mode,
        })
    steps: list[dict[str, Any]] = []
    zero = not bool(op.weight.any())

    def finish(lower: NormValue, upper: NormValue, exact: NormValue | None) -> Sandwich:
        prob = None
        if probabilistic:
            from spectral.probabilistic import probabilistic_upper

            prob = probabilistic_upper(op, delta=delta, rtol=max(rtol / 2, 1e-3), seed=seed)
            steps.append({"step": "probabilistic_upper", "value": prob.value, "seconds": prob.seconds})
        return Sandwich(lower, upper, exact, prob, rtol, time.perf_counter() - t0, steps, layer)

    if zero:  # the zero operator: norm exactly 0 (no certificate of 0 I - 0 can succeed)
        ex = _exact(op, 0.0, "zero_weight", 0.0, {"error_bound": 0.0})
        steps.append({"step": "zero_weight", "value": 0.0, "seconds": 0.0})
        return finish(ex, ex, ex)

    # 2. linear: the operator norm is the weight's largest singular value
    if op.kind == "linear":
        ts = time.perf_counter()
        value = float(torch.linalg.matrix_norm(op.weight.double(), ord=2))
        ex = _exact(op, value, "svd_weight", time.perf_counter() - ts, {"weight_shape": list(op.weight.shape)})
        steps.append({"step": "svd_weight", "value": value, "seconds": ex.seconds})
        return finish(ex, ex, ex)

    # 3. convolutions
    plan = _plan_cost(op)
    layer["plan"] = plan
    dense_entries = plan["dense_entries"]
    spatial = op.in_shape[1:]
    out_spatial = op.out_shape[1:]
    is_circular_exact = (
        op.padding_mode == "circular"
        and all(n % s == 0 and o == n // s for n, s, o in zip(spatial, op.stride, out_spatial))
    )
    is_circular_sub = (
        op.padding_mode == "circular" and not is_circular_exact
        and all(n % s == 0 and o <= n // s for n, s, o in zip(spatial, op.stride, out_spatial))
    )
    if is_circular_exact and plan["fft_svd_flops"] <= fft_svd_max_flops:
        ex = conv_operator_norm_circular(op.weight, spatial, op.stride, op.dilation, op.groups)
        steps.append({"step": "fft_svd_circular", "value": ex.value, "seconds": ex.seconds})
        return finish(ex, ex, ex)

    # small: dense SVD is exact and cheap (float64 copy of the operator)
    n_min = min(op.in_features, op.out_features)
    if dense_entries <= dense_max_entries and 4.0 * dense_entries * n_min <= dense_max_flops:
        op64 = _with_weight(op, op.weight.to(torch.float64))
        ex = operator_norm_dense(op64, max_entries=dense_max_entries)
        steps.append({"step": "dense_svd", "value": ex.value, "seconds": ex.seconds})
        ex = _exact(op, ex.value, "dense_svd", ex.seconds, {"entries": dense_entries})
        return finish(ex, ex, ex)

    # Fourier certificate grid and extra factor
    if is_circular_exact or is_circular_sub:
        grid, factor = tuple(spatial), 1.0
        upper_kind = "circular_grid_n"
    else:
        grid = certificate_grid(op)
        factor = padding_operator_norm(op.in_shape, op.padding, op.padding_mode)
        upper_kind = "circular_grid_padded"

    # choose the upper-bound method from the up-front cost estimate
    chosen = upper_method
    if upper_method == "auto":
        est = plan["certificate_flops"] / assumed_flops_per_second
        chosen = "fft_cholesky" if est <= budget_seconds else "singla_feizi"
    plan["chosen_upper"] = chosen
    plan["assumed_flops_per_second"] = assumed_flops_per_second
    init = None
    if chosen == "fft_cholesky":
        # certified upper bound from the Fourier blocks (no dependence on the lower bound)
        cert = fourier_certificate(
            op.weight, grid, stride=op.stride, dilation=op.dilation, groups=op.groups, rho=rtol / 4,
            dtype=certificate_dtype, max_memory_bytes=max_memory_bytes, seed=seed,
        )
        steps.append({"step": "fft_cholesky", "value": cert.value * factor, "failed_blocks": cert.details["failed"],
                      "circulant_lower": cert.details["circulant_lower"], "seconds": cert.seconds})
        details = {k: v for k, v in cert.details.items() if k != "argmax_vector"}
        details.update({"bound": upper_kind, "padding_norm_factor": factor})
        upper = NormValue(cert.value * factor, Guarantee.UPPER, "fft_cholesky", cert.iterations, cert.seconds,
                          details)
        # warm start: the plane wave of the top frequency block
        ts = time.perf_counter()
        init = plane_wave(op, cert.details["argmax_frequency"], cert.details["argmax_group"],
                          cert.details["argmax_vector"], cert.details["coarse_grid"], [p[0] for p in op.padding])
        steps.append({"step": "plane_wave_warm_start", "seconds": time.perf_counter() - ts})
    else:
        upper = conv_operator_norm_upper(
            # (before, after) pairs for every spatial dim: conv1d "same" with an even kernel is asymmetric
            op.weight, spatial, stride=op.stride, padding=[p for pair in op.padding for p in pair],
            padding_mode=op.padding_mode, dilation=op.dilation, groups=op.groups, method=chosen,
        )
        steps.append({"step": chosen, "value": upper.value, "seconds": upper.seconds})
    low = operator_norm_lower(op, method=lower_method, tol=rtol / 100, max_iter=lower_iters, init=init, seed=seed)
    steps.append({"step": f"lower_{lower_method}", "value": low.value, "iterations": low.iterations,
                  "seconds": low.seconds})
    if chosen == "fft_cholesky" and is_circular_exact and cert.details["circulant_lower"] > low.value:
        # the layer is the circulant itself: a frequency block's Rayleigh quotient bounds it from below
        low = NormValue(cert.details["circulant_lower"], Guarantee.LOWER, "fft_block_power", None, cert.seconds,
                        {"vector": low.details["vector"]})
    # refine the lower bound (warm-started) while the gap is open, it still moves and time remains
    rounds = 0
    while upper.value > low.value * (1 + rtol) and time.perf_counter() - t0 < budget_seconds and rounds < max_refine:
        rounds += 1
        more = operator_norm_lower(
            op, method=lower_method, tol=rtol / 400, max_iter=2 * lower_iters, init=low.details["vector"],
            seed=seed,
        )
        steps.append({"step": f"lower_{lower_method}_warm", "value": more.value, "iterations": more.iterations,
                      "seconds": more.seconds})
        stalled = more.value <= low.value * (1 + rtol / 100)
        if more.value > low.value:
            low = NormValue(more.value, Guarantee.LOWER, more.method, (low.iterations or 0) + (more.iterations or 0),
                            low.seconds + more.seconds, more.details)
        if stalled:
            break
    return finish(low, upper, None)
