"""Sandwich one layer's operator norm between a certified lower and a certified upper bound.

``sandwich(layer_or_weight, input_shape, rtol=0.02)`` picks methods from an up-front size/cost estimate:

- tiny layers (dense matrix small): exact dense SVD;
- linear layers: exact SVD of the weight;
- circular padding that maps the ``n`` grid onto itself (``n % stride == 0``): the layer *is* a circular
  convolution; exact FFT spectrum when cheap, else the Fourier certificate below (which is then a bound on
  the layer itself);
- zero padding: the layer is a compression of the circular convolution on a grid ``m >= n + p_l + p_r``
  (a multiple of the stride), so any bound on that circular operator bounds the layer;
- reflect/replicate padding: ``conv_valid o pad``: circular-grid bound times ``||pad||`` (exact:
  ``sqrt(max copies of one pixel)``).

The Fourier certificate ("fft_cholesky"): each frequency block ``B(w)`` of the circular operator gives a
Hermitian ``H(w) = B B^H`` (or ``B^H B``, the smaller side); ``||B(w)||^2 <= mu`` iff ``mu I - H(w)`` is
positive semi-definite, which a Cholesky factorisation certifies at a cost of ``r^3/3`` per frequency (cheaper
than an SVD or Gram iteration). The target ``mu`` comes from the lower bound (``(lower (1 + rtol/2))^2``);
frequencies that fail get their own ``mu`` from ``eigvalsh`` and are re-certified. A rigorous floating-point
margin (Cholesky backward error ``gamma_{n+1} tr(mu I - H)`` plus the error of forming ``H``) is added, so the
result is a certificate also in float32 (where the margin is larger).

The lower bound is a Rayleigh quotient of the true layer (power iteration or Lanczos from
``spectral.lower``), warm-started across refinements. Refinement stops when ``upper/lower - 1 <= rtol`` or the
time budget is spent.

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

from spectral.guarantee import Guarantee, NormValue

__all__ = ["Sandwich", "sandwich", "fourier_certificate", "padding_operator_norm", "circular_grid"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d)


# ----------------------------------------------------------------------------------------------- results
def _json_safe(value: Any) -> Any:
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Guarantee):
        return value.value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items() if not torch.is_tensor(v)}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if torch.is_tensor(value):
        return value.tolist() if value.numel() <= 16 else f"tensor{tuple(value.shape)}"
    return str(value)


def norm_value_dict(nv: NormValue | None) -> dict[str, Any] | None:
    """JSON-friendly dict of a NormValue (tensors such as warm-start vectors are dropped)."""
    if nv is None:
        return None
    return {
        "value": _json_safe(float(nv.value)),
        "guarantee": nv.guarantee.value,
        "method": nv.method,
        "iterations": nv.iterations,
        "seconds": nv.seconds,
        "details": _json_safe(nv.details),
    }


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
            "gap": _json_safe(self.gap),
            "rtol": self.rtol,
            "converged": self.converged,
            "seconds": self.seconds,
            "methods": self.methods,
            "steps": _json_safe(self.steps),
            "layer": _json_safe(self.layer),
        }


# ----------------------------------------------------------------------------------------------- helpers
def _unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2.0


def _gamma(n: int, u: float) -> float:
    nu = n * u
    if nu >= 0.5:
        raise ValueError(f"matrix too large for a float round-off certificate in this precision (n*u={nu:.2g})")
    return nu / (1.0 - nu)


def circular_grid(
    spatial: Sequence[int], padding: Sequence[tuple[int, int]], stride: Sequence[int]
) -> tuple[int, ...]:
    """Smallest circular grid ``m >= n + p_l + p_r`` divisible by the stride (per spatial dim)."""
    out = []
    for n, (pl, pr), s in zip(spatial, padding, stride):
        total = n + pl + pr
        out.append(int(math.ceil(total / s) * s))
    return tuple(out)


def padding_operator_norm(in_shape: Sequence[int], padding: Sequence[tuple[int, int]], mode: str) -> float:
    """Exact norm of a padding map ``x -> pad(x)``: ``sqrt(max number of copies of one input entry)``.

    Padding copies entries (or inserts zeros), so ``P^T P`` is diagonal with those counts.
    """
    from spectral.operators import LayerOperator  # local: keeps import light

    if mode == "zeros" or not any(p for pair in padding for p in pair):
        return 1.0
    nd = len(padding)
    c = 1
    weight = torch.ones(c, c, *([1] * nd), dtype=torch.float64)
    flat: list[int] = []
    for pl, pr in padding:
        flat += [pl, pr]
    op = LayerOperator.conv(weight, (c, *in_shape[1:]), padding=flat if nd == 2 else padding[0][0], padding_mode=mode)
    if nd == 1 and padding[0][0] != padding[0][1]:
        raise ValueError("asymmetric 1-d padding is not supported")
    ones = torch.ones((1, *op.out_shape), dtype=torch.float64)
    counts = op.adjoint(ones)
    return math.sqrt(float(counts.max()))


def fourier_certificate(
    weight: torch.Tensor,
    grid: Sequence[int],
    target: float,
    *,
    stride: Sequence[int] | int = 1,
    dilation: Sequence[int] | int = 1,
    groups: int = 1,
    dtype: torch.dtype = torch.float64,
    max_memory_bytes: int = 2**30,
) -> NormValue:
    """Certified upper bound on the norm of the circular convolution on ``grid`` via per-frequency Cholesky.

    Certifies ``||B(w)||^2 <= mu`` for every frequency block ``B(w)``, starting from ``mu = target^2``;
    blocks that fail get ``mu(w) = lambda_max(H(w)) (1 + 1e-7)`` and are certified again. The returned value
    is ``sqrt(max_w mu(w) + margin(w))`` with a rigorous floating-point margin; ``details["argmax"]``
    gives the frequency index with the largest certified value, ``details["failed"]`` how many blocks
    exceeded the target.

    References: Sedghi et al. (2019); Senderovich et al. (2022); Higham (2002), Thm 10.3.
    """
    from spectral.exact import iter_fourier_blocks

    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"certificate dtype must be float32 or float64, got {dtype}")
    if not target >= 0 or not math.isfinite(target):
        raise ValueError(f"target must be finite and >= 0, got {target}")
    t0 = time.perf_counter()
    w = weight.detach().to(dtype)
    u = _unit_roundoff(dtype)
    c_out = w.shape[0] // groups
    taps = math.prod(w.shape[2:])
    strides = (stride,) * (w.dim() - 2) if isinstance(stride, int) else tuple(stride)
    c_side = (w.shape[1]) * math.prod(strides)
    r = min(c_out, c_side)
    inner = max(c_out, c_side)
    bytes_per = 16 if dtype == torch.float64 else 8
    # per frequency block: B (c_out x c_side), H and its factor (r x r), some workspace
    per_block = bytes_per * (c_out * c_side + 3 * r * r) * groups
    chunk_blocks = max(1, int(max_memory_bytes // max(per_block, 1)))
    entries_per_block = groups * c_out * c_side
    mu0 = float(target) ** 2
    best = 0.0
    best_index = -1
    failed = 0
    n_blocks = 0
    max_margin_rel = 0.0
    grid_arg: Any = tuple(grid) if len(grid) > 1 else int(grid[0])
    gamma_chol = _gamma(4 * (r + 1), u)
    gamma_form = _gamma(4 * (inner + 2 * taps + 2), u)
    eye = torch.eye(r, dtype=torch.complex128 if dtype == torch.float64 else torch.complex64)
    for blocks in iter_fourier_blocks(
        w, grid_arg, strides if len(strides) > 1 else strides[0], dilation, groups,
        onesided=True, max_entries=chunk_blocks * entries_per_block,
    ):
        B = blocks.reshape(-1, c_out, blocks.shape[-1])
        H = B @ B.mH if c_out <= c_side else B.mH @ B
        fro2 = B.abs().square().sum(dim=(-2, -1)).real.to(torch.float64)  # ||B||_F^2 per block
        trace_h = torch.diagonal(H, dim1=-2, dim2=-1).real.sum(-1).to(torch.float64)
        mu = torch.full((H.shape[0],), mu0, dtype=torch.float64)
        _, info = torch.linalg.cholesky_ex(mu0 * eye - H)
        bad = (info != 0).nonzero().flatten()
        if bad.numel():
            failed += int(bad.numel())
            lam = torch.linalg.eigvalsh(H[bad])[..., -1].real.to(torch.float64)
            mu_bad = torch.maximum(lam, torch.zeros_like(lam)) * (1 + 1e-7) + 1e-30
            for _ in range(60):
                _, info_b = torch.linalg.cholesky_ex(mu_bad.to(H.real.dtype)[:, None, None] * eye - H[bad])
                still = info_b != 0
                if not still.any():
                    break
                mu_bad = torch.where(still, mu_bad * (1 + 1e-5) + fro2[bad] * 1e-7, mu_bad)
            else:  # pragma: no cover - pathological round-off
                raise RuntimeError("Cholesky certificate did not succeed; the weights may contain NaN/Inf")
            mu[bad] = mu_bad
        # rigorous margin: Cholesky backward error on mu I - H plus error of forming H (and its blocks)
        trace_b = r * mu - trace_h
        margin = gamma_chol * torch.clamp(trace_b, min=0) * (1 + 2 * gamma_chol) + gamma_form * fro2 * 2
        certified = mu + margin
        idx = int(torch.argmax(certified))
        if float(certified[idx]) > best:
            best = float(certified[idx])
            best_index = n_blocks + idx
        max_margin_rel = max(max_margin_rel, float((margin / torch.clamp(mu, min=1e-300)).max()))
        n_blocks += H.shape[0]
    value = math.sqrt(max(best, 0.0))
    return NormValue(
        value, Guarantee.UPPER, "fft_cholesky", n_blocks, time.perf_counter() - t0,
        {
            "grid": list(grid), "target": float(target), "blocks": n_blocks, "failed": failed,
            "argmax": best_index, "block_size": r, "dtype": str(dtype).replace("torch.", ""),
            "max_roundoff_margin_rel": max_margin_rel,
        },
    )


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
    spatial_in = op.in_shape[1:]
    grid = circular_grid(spatial_in, op.padding, op.stride)
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
    dense_max_entries: int = 2**22,
    fft_svd_max_flops: float = 5e10,
    lower_method: str = "lanczos",
    lower_iters: int = 60,
    certificate_dtype: torch.dtype = torch.float64,
    probabilistic: bool = False,
    delta: float = 1e-3,
    seed: int = 0,
) -> Sandwich:
    """Certified ``lower <= ||layer||_2 <= upper`` for a conv1d/conv2d/linear layer at ``input_shape``.

    ``layer_or_weight`` is an ``nn.Conv1d/Conv2d/Linear`` (its own stride/padding/... are used) or a weight
    tensor with the conv parameters given here. ``input_shape`` excludes the batch: ``(C, H, W)``, ``(C, L)``
    or ``(F,)``. Refines until ``upper/lower - 1 <= rtol`` or ``budget_seconds``; ``max_memory_bytes`` bounds
    the Fourier blocks held at once. ``probabilistic=True`` adds a Krylov upper bound that holds with
    probability ``1 - delta``.

    References: Sedghi et al. (2019); Senderovich et al. (2022); Higham (2002); Kuczynski & Wozniakowski (1992).
    """
    from spectral.exact import conv_operator_norm_circular, operator_norm_dense
    from spectral.lower import LOWER_METHODS, operator_norm_lower

    if not rtol > 0:
        raise ValueError(f"rtol must be > 0 (relative gap upper/lower - 1), got {rtol!r}")
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

    def finish(lower: NormValue, upper: NormValue, exact: NormValue | None) -> Sandwich:
        prob = None
        if probabilistic:
            from spectral.probabilistic import probabilistic_upper

            prob = probabilistic_upper(op, delta=delta, rtol=max(rtol / 2, 1e-3), seed=seed)
            steps.append({"step": "probabilistic_upper", "value": prob.value, "seconds": prob.seconds})
        return Sandwich(lower, upper, exact, prob, rtol, time.perf_counter() - t0, steps, layer)

    # 1. tiny: dense SVD is exact and cheap (float64 copy of the operator)
    dense_entries = op.in_features * op.out_features
    if dense_entries <= dense_max_entries:
        op64 = _with_weight(op, op.weight.to(torch.float64))
        ex = operator_norm_dense(op64, max_entries=dense_max_entries)
        steps.append({"step": "dense_svd", "value": ex.value, "seconds": ex.seconds})
        ex = _exact(op, ex.value, "dense_svd", ex.seconds, {"entries": dense_entries})
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

    # Fourier certificate grid and extra factor
    if is_circular_exact or is_circular_sub:
        grid, factor = tuple(spatial), 1.0
        upper_kind = "circular_grid_n"
    else:
        grid = circular_grid(spatial, op.padding, op.stride)
        factor = padding_operator_norm(op.in_shape, op.padding, op.padding_mode)
        upper_kind = "circular_grid_padded"

    # lower bound on the true layer; the certificate's target comes from it
    low = operator_norm_lower(op, method=lower_method, tol=rtol / 50, max_iter=lower_iters, seed=seed)
    steps.append({"step": f"lower_{lower_method}", "value": low.value, "iterations": low.iterations,
                  "seconds": low.seconds})
    target = low.value * (1 + rtol / 2) / factor
    cert = fourier_certificate(
        op.weight, grid, target, stride=op.stride, dilation=op.dilation, groups=op.groups,
        dtype=certificate_dtype, max_memory_bytes=max_memory_bytes,
    )
    steps.append({"step": "fft_cholesky", "value": cert.value * factor, "target": target * factor,
                  "failed_blocks": cert.details["failed"], "seconds": cert.seconds})
    details = dict(cert.details)
    details.update({"bound": upper_kind, "padding_norm_factor": factor})
    upper = NormValue(cert.value * factor, Guarantee.UPPER, "fft_cholesky", cert.iterations, cert.seconds, details)
    # refine the lower bound (warm-started) while the gap is open, it still moves and time remains
    while upper.value > low.value * (1 + rtol) and time.perf_counter() - t0 < budget_seconds:
        more = operator_norm_lower(
            op, method=lower_method, tol=rtol / 200, max_iter=2 * lower_iters, init=low.details["vector"],
            seed=seed,
        )
        steps.append({"step": f"lower_{lower_method}_warm", "value": more.value, "iterations": more.iterations,
                      "seconds": more.seconds})
        stalled = more.value <= low.value * (1 + 1e-6)
        if more.value > low.value:
            low = NormValue(more.value, Guarantee.LOWER, more.method, (low.iterations or 0) + (more.iterations or 0),
                            low.seconds + more.seconds, more.details)
        if stalled:
            break
    return finish(low, upper, None)
