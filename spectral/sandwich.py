"""Sandwich one layer's operator norm between a certified lower and a certified upper bound.

``sandwich(layer_or_weight, input_shape, rtol=0.02)`` returns exact values where they exist and otherwise
``lower <= ||layer|| <= upper`` with ``upper / lower - 1 <= rtol`` when the budget allows:

- zero weights: 0, exactly; linear layers: float64 SVD of the weight;
- convolutions (``spectral.ladder``): 1x1 kernels (any stride and padding), circular "same" layers (FFT),
  small operators and small-per-group grouped/depthwise layers are exact; otherwise a ladder of certificates
  chosen by up-front cost estimates: the circulant embedding (``spectral.circulant``, "fft_cholesky"), one axis
  exact and one in a twisted circulant ("axis_cholesky") and the true zero-padded operator ("banded_cholesky",
  ``spectral.toeplitz``), with copy padding through ``conv_valid o pad`` and the exact ``||pad||``;
- the lower bound is a Lanczos (or power) Rayleigh quotient of the true layer, warm-started from the circulant's
  top plane wave, refined while it moves, evaluated in float64.

When ``rtol`` is not reached the result says so (``converged``, ``reason``, ``suggestion``). Every certified
value carries a rigorous floating-point margin (``spectral.roundoff``). ``strategy="circulant"`` reproduces the
previous method (circulant certificate only) for comparisons.

References: Sedghi, Gupta & Long (2019); Senderovich et al. (2022); Higham, "Accuracy and Stability of
Numerical Algorithms", Thm 10.3; Delattre, Barthelemy & Allauzen (2024); Golub & Van Loan (Lanczos, banded
Cholesky).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Sequence

import torch
from torch import nn

from spectral.guarantee import NormValue, json_safe
from spectral.circulant import _FourierGram, fourier_certificate, plane_wave  # noqa: F401  (re-exported)
from spectral.ladder import (  # noqa: F401  (re-exported)
    LADDER, Outcome, Run, _plan_cost, boundary_flow, certificate_grid, circulant_flow, circular_grid, exact_value,
    padding_operator_norm)

__all__ = ["Sandwich", "SandwichOptions", "sandwich", "fourier_certificate", "padding_operator_norm", "circular_grid"]

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
    ``converged`` is ``gap <= rtol``; when it is False, ``reason`` says why and ``suggestion`` what would close
    the gap (a named method with its estimated time, or a larger budget).
    """

    lower: NormValue
    upper: NormValue
    exact: NormValue | None = None
    probabilistic_upper: NormValue | None = None
    rtol: float = 0.02
    seconds: float = 0.0
    steps: list[dict[str, Any]] = field(default_factory=list)
    layer: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    suggestion: str | None = None

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
            "reason": self.reason,
            "suggestion": self.suggestion,
            "seconds": self.seconds,
            "methods": self.methods,
            "steps": json_safe(self.steps),
            "layer": json_safe(self.layer),
        }


# ----------------------------------------------------------------------------------------------- helpers
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


# ----------------------------------------------------------------------------------------------- options
STRATEGIES = ("boundary", "circulant")
# the options ``spectral.ladder`` reads from ``Run.opts``
_RUN_OPTIONS = ("dense_max_entries", "dense_max_flops", "fft_svd_max_flops", "lower_method", "upper_method",
                "assumed_flops_per_second", "lower_iters", "max_refine", "certificate_dtype", "max_memory_bytes",
                "seed", "rho_fraction", "jump", "accept_fraction")


@dataclass(frozen=True)
class SandwichOptions:
    """The cost knobs of ``sandwich`` (every one can also be given to ``sandwich`` as a keyword).

    ``budget_seconds``: wall-clock budget of the certificate ladder; ``max_memory_bytes``: blocks held at once;
    ``dense_max_entries`` / ``dense_max_flops`` / ``fft_svd_max_flops``: sizes up to which a conv is solved
    exactly (dense SVD, per-frequency SVD); ``lower_method`` / ``upper_method``: forced methods ("auto": the
    ladder); ``strategy``: "boundary" (cost-ordered ladder) or "circulant" (the pre-boundary method);
    ``rho_fraction`` / ``accept_fraction`` / ``jump``: where certificates aim, where they may stop, when a rung is
    skipped; ``assumed_flops_per_second``: the cost model's speed; ``lower_iters`` / ``max_refine``: Lanczos
    steps and refinements; ``certificate_dtype``: float32 speeds up ``fft_cholesky`` (larger margin);
    ``probabilistic`` / ``delta``: add a Krylov upper bound holding with probability ``1 - delta``; ``seed``.
    """

    budget_seconds: float = 120.0
    max_memory_bytes: int = 2**30
    dense_max_entries: int = 2**20
    dense_max_flops: float = 5e9
    fft_svd_max_flops: float = 5e10
    lower_method: str = "lanczos"
    upper_method: str = "auto"
    strategy: str = "boundary"
    rho_fraction: float = 0.1
    accept_fraction: float = 0.9
    jump: float = 1.0
    assumed_flops_per_second: float = 2e10
    lower_iters: int = 12
    max_refine: int = 4
    certificate_dtype: torch.dtype = torch.float64
    probabilistic: bool = False
    delta: float = 1e-3
    seed: int = 0

    def updated(self, **knobs: Any) -> "SandwichOptions":
        """A copy with ``knobs`` changed; an unknown name is a TypeError that lists the valid ones."""
        valid = {f.name for f in fields(self)}
        unknown = sorted(set(knobs) - valid)
        if unknown:
            raise TypeError(f"sandwich got unexpected keyword argument(s) {', '.join(unknown)}; valid options: "
                            f"{', '.join(sorted(valid))}")
        return replace(self, **knobs) if knobs else self

    def run_options(self) -> dict[str, Any]:
        """The options of the certificate ladder (``spectral.ladder.Run.opts``)."""
        return {name: getattr(self, name) for name in _RUN_OPTIONS}

    def validate(self, rtol: float) -> None:
        from spectral.lower import LOWER_METHODS
        from spectral.upper import UPPER_METHODS

        if not rtol > 0:
            raise ValueError(f"rtol must be > 0 (relative gap upper/lower - 1), got {rtol!r}")
        valid_upper = ("auto", *LADDER, *UPPER_METHODS)
        if self.upper_method not in valid_upper:
            raise ValueError(f"unknown upper_method {self.upper_method!r}; valid: {', '.join(valid_upper)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if self.lower_method not in LOWER_METHODS:
            raise ValueError(f"unknown lower_method {self.lower_method!r}; valid: {', '.join(LOWER_METHODS)}")
        if self.budget_seconds <= 0 or self.max_memory_bytes <= 0:
            raise ValueError("budget_seconds and max_memory_bytes must be > 0")
        rho, acc, jump = self.rho_fraction, self.accept_fraction, self.jump
        if not 0 < rho < 1 or not jump >= 1 or not rho <= acc <= 1:
            raise ValueError(f"need 0 < rho_fraction < 1, rho_fraction <= accept_fraction <= 1 and jump >= 1, got "
                             f"{rho!r}, {acc!r}, {jump!r}")


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
    options: SandwichOptions | None = None,
    **knobs: Any,
) -> Sandwich:
    """Certified ``lower <= ||layer||_2 <= upper`` for a conv1d/conv2d/linear layer at ``input_shape``.

    ``layer_or_weight`` is an ``nn.Conv1d/Conv2d/Linear`` (its own stride/padding/... are used) or a weight
    tensor with the conv parameters given here. ``input_shape`` excludes the batch: ``(C, H, W)``, ``(C, L)``
    or ``(F,)``. Exact values where they exist (linear layers, 1x1 convs, circular "same" convs, small or
    small-per-group operators), else certified bounds refined until ``upper/lower - 1 <= rtol`` or the budget
    (``spectral.ladder``): ``strategy="boundary"`` climbs ``fft_cholesky -> axis_cholesky -> banded_cholesky`` by
    up-front cost estimates, certificates at ``rho = rho_fraction * rtol`` above their target, or at
    ``lower (1 + accept_fraction * rtol)`` where that spares a factorisation; ``strategy="circulant"`` is the
    pre-boundary method (circulant certificate at ``rho = rtol/4`` or, over budget, Singla-Feizi), kept for
    comparisons. ``upper_method`` forces one certificate (a ladder name or any of ``spectral.upper.UPPER_METHODS``).
    The cost knobs are the fields of ``SandwichOptions``: pass ``options=SandwichOptions(...)`` or any of them as
    keywords (keywords override ``options``). When the gap stays above ``rtol`` the result says why (``reason``)
    and what would close it (``suggestion``).

    References: Sedghi et al. (2019); Senderovich et al. (2022); Higham (2002); Delattre et al. (2024);
    Kuczynski & Wozniakowski (1992).
    """
    opts = (options if options is not None else SandwichOptions()).updated(**knobs)
    opts.validate(rtol)
    t0 = time.perf_counter()
    op = _as_operator(layer_or_weight, input_shape, stride, padding, padding_mode, dilation, groups)
    if not torch.isfinite(op.weight).all():
        raise ValueError("weight contains NaN or Inf; spectral norms need finite weights")
    layer = _layer_record(op)
    run = Run(op, rtol, opts.budget_seconds, t0, opts.run_options())
    out = _bounds(run, layer, opts.strategy)
    prob = None
    if opts.probabilistic:
        from spectral.probabilistic import probabilistic_upper

        prob = probabilistic_upper(op, delta=opts.delta, rtol=max(rtol / 2, 1e-3), seed=opts.seed)
        run.steps.append({"step": "probabilistic_upper", "value": prob.value, "seconds": prob.seconds})
    return Sandwich(out.lower, out.upper, out.exact, prob, rtol, time.perf_counter() - t0, run.steps, layer,
                    out.reason, out.suggestion)


def _bounds(run: Run, layer: dict[str, Any], strategy: str) -> Outcome:
    """Exact values or certified bounds of ``run.op``: zero weight, linear layer, or the conv ladder."""
    op = run.op
    if not bool(op.weight.any()):  # the zero operator: norm exactly 0 (no certificate of 0 I - 0 can succeed)
        ex = exact_value(0.0, "zero_weight", 0.0, {"error_bound": 0.0})
        run.steps.append({"step": "zero_weight", "value": 0.0, "seconds": 0.0})
        return Outcome(ex, ex, ex)
    if op.kind == "linear":
        return _linear_exact(run)
    run.plan = _plan_cost(op)
    layer["plan"] = run.plan
    layer["strategy"] = strategy
    return (boundary_flow if strategy == "boundary" else circulant_flow)(run)


def _layer_record(op: Any) -> dict[str, Any]:
    layer = {"kind": op.kind, "weight_shape": list(op.weight.shape), "in_shape": list(op.in_shape),
             "out_shape": list(op.out_shape)}
    if op.kind != "linear":
        layer.update({"stride": list(op.stride), "padding": [list(p) for p in op.padding],
                      "dilation": list(op.dilation), "groups": op.groups, "padding_mode": op.padding_mode})
    return layer


def _linear_exact(run: Run) -> Outcome:
    """A linear layer's norm is its weight's largest singular value (float64 SVD, error stated)."""
    from spectral.roundoff import unit_roundoff

    ts = time.perf_counter()
    w = run.op.weight.detach().to(torch.float64)
    value = float(torch.linalg.matrix_norm(w, ord=2))
    err = 4 * max(w.shape) * unit_roundoff(torch.float64) * value
    ex = exact_value(value, "svd_weight", time.perf_counter() - ts,
                     {"weight_shape": list(w.shape), "error_bound": err, "computed_in": "float64"})
    run.steps.append({"step": "svd_weight", "value": value, "seconds": ex.seconds})
    return Outcome(ex, ex, ex)
