"""How ``sandwich`` bounds a convolution: exact shortcuts, then a ladder of certificates chosen by cost.

Exact values first (labelled ``exact``, round-off stated in ``details["error_bound"]``):

- ``pointwise``: a 1x1 kernel (any stride, any padding) is ``W (x) S`` with ``S`` a 0/1 sampling/copying map,
  so ``||layer|| = max_groups ||W_g||_2 * ||S||`` with ``||S||^2`` the largest number of outputs that read one
  input (1 for zero padding; copy padding can read a pixel twice);
- ``fft_circular``: a circular convolution that maps its grid onto itself, when the FFT spectrum is cheap;
- ``dense_svd``: a small operator; ``dense_svd_groups``: a grouped/depthwise conv whose per-group operators are
  small (the norm of a block-diagonal operator is the max over its blocks).

Otherwise an upper-bound ladder, loosest and cheapest first, each certificate run only while the gap exceeds
``rtol`` and its up-front cost estimate (flops at ``assumed_flops_per_second``) fits the remaining budget:

1. ``fft_cholesky``: the circulant embedding (``spectral.circulant``), a few percent loose at 8x8 inputs;
2. ``axis_cholesky``: one spatial axis exact, the other embedded in a (twisted) circulant (``spectral.toeplitz``);
3. ``banded_cholesky``: the true zero-padded operator, block-banded Cholesky (``spectral.toeplitz``).

A rung is skipped when a later one is estimated at most ``jump`` times its cost (small layers go straight to the
exact banded certificate); certificates may stop at the accept level ``lower (1 + accept_fraction * rtol)``. On
small maps the circulant rung gives up after its sampled estimate when that already exceeds ``lower (1 + rtol)``.
The lower bound is a Lanczos Rayleigh quotient of the true layer, warm-started from the circulant's top plane
wave and refined while it still moves; its final quotient is evaluated in float64. When the gap stays above
``rtol`` the result says why and what would close it (``reason``, ``suggestion``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from spectral.guarantee import Guarantee, NormValue
from spectral.roundoff import gamma, unit_roundoff
from spectral.upper import padding_map_norm, zero_padding_grid

LADDER = ("fft_cholesky", "axis_cholesky", "banded_cholesky")


@dataclass
class Run:
    """One ``sandwich`` call on a conv operator: options, recorded steps and the clock."""

    op: Any
    rtol: float
    budget: float
    t0: float
    opts: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def seconds(self, flops: float) -> float:
        return flops / self.opts["assumed_flops_per_second"]

    def accept(self, lower: float) -> float:
        """The level a certificate may stop at: ``lower (1 + accept_fraction * rtol)``."""
        return lower * (1 + self.opts["accept_fraction"] * self.rtol)


@dataclass
class Outcome:
    lower: NormValue
    upper: NormValue
    exact: NormValue | None = None
    reason: str | None = None
    suggestion: str | None = None


def exact_value(value: float, method: str, seconds: float, details: dict[str, Any]) -> NormValue:
    return NormValue(float(value), Guarantee.EXACT, method, None, seconds, details)


def _exact_outcome(run: Run, nv: NormValue) -> Outcome:
    run.steps.append({"step": nv.method, "value": nv.value, "seconds": nv.seconds})
    return Outcome(nv, nv, nv)


# ----------------------------------------------------------------------------------------------- geometry, costs
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
    return math.prod(padding_map_norm(n, pl, pr, mode) for n, (pl, pr) in zip(in_shape[1:], padding))


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


# ----------------------------------------------------------------------------------------------- exact values
def sampling_norm(op: Any) -> float:
    """``||S||`` of the 0/1 map ``x -> pad(x)[stride * o]`` (1x1 kernels): sqrt of the most reads of one input."""
    total = 1.0
    for n, m, s, (pl, pr) in zip(op.in_shape[1:], op.out_shape[1:], op.stride, op.padding):
        idx = torch.arange(n, dtype=torch.float64).view(1, 1, n)
        if op.padding_mode == "zeros" or (pl == 0 and pr == 0):
            src = torch.cat([torch.full((pl,), -1.0), idx.flatten(), torch.full((pr,), -1.0)])
        else:
            src = F.pad(idx, [pl, pr], mode=op.padding_mode).flatten()
        read = src[s * torch.arange(m)].long()
        read = read[read >= 0]
        if read.numel() == 0:
            return 0.0
        total *= float(torch.bincount(read).max())
    return math.sqrt(total)


def pointwise_exact(run: Run) -> Outcome | None:
    op = run.op
    if any(k != 1 for k in op.weight.shape[2:]):
        return None
    t = time.perf_counter()
    w = op.weight.detach().to(torch.float64).reshape(op.groups, op.weight.shape[0] // op.groups, -1)
    sv = torch.linalg.svdvals(w)[:, 0] if w.shape[-1] and w.shape[-2] else torch.zeros(op.groups)
    value = float(sv.max()) * sampling_norm(op)
    err = 4 * max(w.shape[1:]) * unit_roundoff(torch.float64) * value
    return _exact_outcome(run, exact_value(value, "pointwise", time.perf_counter() - t, {
        "error_bound": err, "sampling_norm": sampling_norm(op), "computed_in": "float64",
        "note": "1x1 kernel: ||W (x) S|| = max_groups ||W_g||_2 * ||S||"}))


def grouped_dense_exact(run: Run) -> Outcome | None:
    """Max over groups of the dense per-group norms when every group's operator is small."""
    from spectral.exact import operator_norm_dense
    from spectral.operators import LayerOperator

    op, g = run.op, run.op.groups
    if g == 1:
        return None
    per = (op.in_features // g) * (op.out_features // g)
    n_min = min(op.in_features, op.out_features) // g
    if per > run.opts["dense_max_entries"] or 4.0 * per * n_min * g > run.opts["dense_max_flops"]:
        return None
    t = time.perf_counter()
    w = op.weight.detach().to(torch.float64)
    co, ci = w.shape[0] // g, w.shape[1]
    best = 0.0
    for k in range(g):
        sub = LayerOperator.conv(w[k * co:(k + 1) * co], (ci, *op.in_shape[1:]), op.stride,
                                 [p for pair in op.padding for p in pair] if op.kind == "conv2d" else op.padding[0],
                                 op.dilation, 1, op.padding_mode)
        best = max(best, operator_norm_dense(sub).value)
    err = 4 * max(op.in_features, op.out_features) // g * unit_roundoff(torch.float64) * best
    return _exact_outcome(run, exact_value(best, "dense_svd_groups", time.perf_counter() - t,
                                           {"groups": g, "entries_per_group": per, "error_bound": err}))


# ----------------------------------------------------------------------------------------------- lower bound
def certified_rayleigh(op: Any, v: torch.Tensor) -> float:
    """``||A v|| / ||v||`` of the float64 copy of ``op``, rounded down by a rigorous margin (a lower bound)."""
    from spectral.operators import LayerOperator

    op64 = LayerOperator(op.kind, op.weight.detach().to(torch.float64), op.in_shape, op.out_shape, op.stride,
                         op.padding, op.dilation, op.groups, op.padding_mode)
    x = v.detach().reshape(1, *op.in_shape).to(torch.float64)
    nx = float(torch.linalg.vector_norm(x))
    if nx == 0:
        return 0.0
    with torch.no_grad():
        ny = float(torch.linalg.vector_norm(op64.forward(x)))
    terms = math.prod(op.weight.shape[1:]) + 8
    return ny / nx * (1 - 2 * gamma(terms, unit_roundoff(torch.float64)))


def lower_bound(run: Run, init: torch.Tensor | None, stall: bool = False) -> NormValue:
    """Lanczos/power Rayleigh quotient of the true layer (``init``: a warm start, e.g. the top plane wave);
    ``stall``: stop once a step raises it by at most ``rtol / 200`` (the ladder's windowed warm starts)."""
    from spectral.lower import operator_norm_lower

    o = run.opts
    low = operator_norm_lower(run.op, method=o["lower_method"], tol=run.rtol / 100, max_iter=o["lower_iters"],
                              init=init, seed=o["seed"], stall_tol=run.rtol / 200 if stall else None)
    run.steps.append({"step": f"lower_{o['lower_method']}", "value": low.value, "iterations": low.iterations,
                      "seconds": low.seconds})
    return low


def refine_lower(run: Run, low: NormValue, upper: float, rounds: int) -> NormValue:
    """Warm-restarted Lanczos while the gap exceeds rtol, time remains and the bound still moves."""
    from spectral.lower import operator_norm_lower

    o = run.opts
    for _ in range(rounds):
        if upper <= low.value * (1 + run.rtol) or run.left() <= 0:
            break
        more = operator_norm_lower(run.op, method=o["lower_method"], tol=run.rtol / 400, max_iter=2 * o["lower_iters"],
                                   init=low.details["vector"], seed=o["seed"])
        run.steps.append({"step": f"lower_{o['lower_method']}_warm", "value": more.value,
                          "iterations": more.iterations, "seconds": more.seconds})
        stalled = more.value <= low.value * (1 + run.rtol / 100)
        if more.value > low.value:
            low = NormValue(more.value, Guarantee.LOWER, more.method, (low.iterations or 0) + (more.iterations or 0),
                            low.seconds + more.seconds, more.details)
        if stalled:
            break
    return low


def finalize_lower(run: Run, low: NormValue) -> NormValue:
    """Re-evaluate the final Rayleigh quotient in float64 (a float32 forward can round above the norm)."""
    value = certified_rayleigh(run.op, low.details["vector"])
    return NormValue(value, Guarantee.LOWER, low.method, low.iterations, low.seconds,
                     {**low.details, "evaluated_in": "float64"})


# ----------------------------------------------------------------------------------------------- shapes of the layer
def circular_case(op: Any) -> str | None:
    """"exact" when the circular layer maps its grid onto itself, "subset" for a row subset of ``circ(n)``."""
    if op.padding_mode != "circular":
        return None
    dims = list(zip(op.in_shape[1:], op.stride, op.out_shape[1:]))
    if all(n % s == 0 and o == n // s for n, s, o in dims):
        return "exact"
    if all(n % s == 0 and o <= n // s for n, s, o in dims):
        return "subset"
    return None


def zero_padded_view(op: Any) -> tuple[Any, float] | None:
    """``(op_z, factor)`` with ``||op|| <= factor * ||op_z||`` and ``op_z`` zero-padded (None for circular
    layers that are, or sit in, ``circ(n)``): copy padding is ``conv_valid o P`` with ``||P||`` exact."""
    from spectral.operators import LayerOperator

    if op.padding_mode == "zeros":
        return op, 1.0
    if not any(p for pair in op.padding for p in pair):  # no padding: the mode is irrelevant
        return LayerOperator(op.kind, op.weight, op.in_shape, op.out_shape, op.stride, op.padding, op.dilation,
                             op.groups, "zeros"), 1.0
    if circular_case(op) is not None:
        return None
    padded = [n + pl + pr for n, (pl, pr) in zip(op.in_shape[1:], op.padding)]
    valid = LayerOperator.conv(op.weight, (op.in_shape[0], *padded), op.stride, 0, op.dilation, op.groups)
    return valid, padding_operator_norm(op.in_shape, op.padding, op.padding_mode)


def rung_estimates(run: Run) -> dict[str, float]:
    """Estimated seconds of each ladder rung that applies (memory over ``max_memory_bytes``: left out)."""
    from spectral.toeplitz import banded_plan

    out = {"fft_cholesky": run.seconds(run.plan["certificate_flops"])}
    view = zero_padded_view(run.op)
    if view is not None:
        modes = ("axis", "exact") if view[0].kind == "conv2d" else ("exact",)
        for mode in modes:
            bp = banded_plan(view[0], mode)
            run.plan[bp["method"]] = bp
            if bp["bytes"] <= run.opts["max_memory_bytes"]:
                out[bp["method"]] = run.seconds(bp["flops"])
    run.plan["estimated_seconds"] = dict(out)
    return out


# ----------------------------------------------------------------------------------------------- certificates
def run_fft(run: Run, rho: float, accept: float | None = None, estimator: str = "power",
            give_up_above: Any = None, window: bool = False) -> tuple[NormValue, torch.Tensor]:
    """The circulant certificate (times ``||P||`` for copy padding) and the top plane wave (a warm start);
    ``estimator``: how block levels are estimated (``spectral.circulant.top_estimate``: "power" is the
    pre-issue-13 procedure of ``strategy="circulant"``, the ladder uses "lanczos"); ``give_up_above``: see
    ``fourier_certificate``; ``window``: the warm start times the lowest Dirichlet mode (zero padding)."""
    from spectral.circulant import fourier_certificate, plane_wave

    op, o = run.op, run.opts
    if circular_case(op) is not None:
        grid, factor, kind = tuple(op.in_shape[1:]), 1.0, "circular_grid_n"
    else:
        grid, factor, kind = certificate_grid(op), padding_operator_norm(op.in_shape, op.padding, op.padding_mode), \
            "circular_grid_padded"
    cert = fourier_certificate(op.weight, grid, stride=op.stride, dilation=op.dilation, groups=op.groups, rho=rho,
                               accept=None if accept is None else accept / factor, estimator=estimator,
                               give_up_above=give_up_above,
                               dtype=o["certificate_dtype"],
                               max_memory_bytes=o["max_memory_bytes"], seed=o["seed"])
    run.steps.append({"step": "fft_cholesky" if accept is None else "fft_cholesky_at_accept",
                      "value": cert.value * factor, "failed_blocks": cert.details["failed"],
                      **({"gave_up": True} if cert.details.get("gave_up") else {}),
                      "circulant_lower": cert.details["circulant_lower"] * factor, "seconds": cert.seconds})
    details = {k: v for k, v in cert.details.items() if k != "argmax_vector"}
    details.update({"bound": kind, "padding_norm_factor": factor, "embedding_lower": details["circulant_lower"] * factor})
    upper = NormValue(cert.value * factor, Guarantee.UPPER, "fft_cholesky", cert.iterations, cert.seconds, details)
    ts = time.perf_counter()
    init = plane_wave(op, cert.details["argmax_frequency"], cert.details["argmax_group"],
                      cert.details["argmax_vector"], cert.details["coarse_grid"], [p[0] for p in op.padding],
                      window=window and op.padding_mode == "zeros")
    run.steps.append({"step": "plane_wave_warm_start", "seconds": time.perf_counter() - ts})
    return upper, init


def run_banded(run: Run, method: str, target: float, rho: float) -> NormValue:
    from spectral.toeplitz import BANDED_MODES, banded_certificate

    view = zero_padded_view(run.op)
    if view is None:
        raise ValueError(f"upper_method {method!r} certifies zero-padded (or copy-padded) convolutions; this "
                         "circular layer is a circulant: use upper_method='fft_cholesky' or 'auto'")
    op_z, factor = view
    mode = {v: k for k, v in BANDED_MODES.items()}[method]
    accept = run.accept(target) / factor  # a frequency whose circulant column is this good needs no LDL
    cert = banded_certificate(op_z, mode=mode, target=target / factor, rho=rho, accept=accept, seed=run.opts["seed"])
    details = {**cert.details, "padding_norm_factor": factor, "embedding_lower": cert.details["block_lower"] * factor}
    run.steps.append({"step": method, "value": cert.value * factor, "embedding_lower": details["embedding_lower"],
                      "seconds": cert.seconds})
    return NormValue(cert.value * factor, Guarantee.UPPER, cert.method, cert.iterations, cert.seconds, details)


def run_cheap(run: Run, method: str) -> NormValue:
    from spectral.upper import conv_operator_norm_upper

    op = run.op
    upper = conv_operator_norm_upper(
        # (before, after) pairs for every spatial dim: conv1d "same" with an even kernel is asymmetric
        op.weight, op.in_shape[1:], stride=op.stride, padding=[p for pair in op.padding for p in pair],
        padding_mode=op.padding_mode, dilation=op.dilation, groups=op.groups, method=method)
    run.steps.append({"step": method, "value": upper.value, "seconds": upper.seconds})
    return upper


def tighter(a: NormValue | None, b: NormValue) -> NormValue:
    return b if a is None or b.value < a.value else a


# ----------------------------------------------------------------------------------------------- the two flows
def circular_fft_exact(run: Run) -> Outcome | None:
    from spectral.exact import conv_operator_norm_circular

    op = run.op
    if circular_case(op) != "exact" or run.plan["fft_svd_flops"] > run.opts["fft_svd_max_flops"]:
        return None
    return _exact_outcome(run, conv_operator_norm_circular(op.weight, op.in_shape[1:], op.stride, op.dilation,
                                                           op.groups))


def dense_exact(run: Run) -> Outcome | None:
    from spectral.exact import operator_norm_dense
    from spectral.operators import LayerOperator

    op, o = run.op, run.opts
    entries = run.plan["dense_entries"]
    if entries > o["dense_max_entries"] or 4.0 * entries * min(op.in_features, op.out_features) > o["dense_max_flops"]:
        return None
    op64 = LayerOperator(op.kind, op.weight.detach().to(torch.float64), op.in_shape, op.out_shape, op.stride,
                         op.padding, op.dilation, op.groups, op.padding_mode)
    ex = operator_norm_dense(op64, max_entries=o["dense_max_entries"])
    return _exact_outcome(run, exact_value(ex.value, "dense_svd", ex.seconds,
                                           {"entries": entries, "error_bound": ex.details["error_bound"]}))


def _circulant_lower(run: Run, upper: NormValue, low: NormValue) -> NormValue:
    """A circular layer *is* the circulant: a frequency block's Rayleigh quotient bounds it from below."""
    block = upper.details.get("circulant_lower", 0.0)
    if upper.details.get("dtype") != "float64":
        return low  # a float32 block estimate can round above the norm
    # a Ritz value of a float64 block, rounded down by its round-off (Rayleigh quotient of a computed vector)
    block *= 1 - 2 * gamma(4 * upper.details.get("block_size", 1) + 8, unit_roundoff(torch.float64))
    if upper.method == "fft_cholesky" and circular_case(run.op) == "exact" and block > low.value:
        return NormValue(block, Guarantee.LOWER, "fft_block_power", None, upper.seconds,
                         {"vector": low.details["vector"], "evaluated_in": "float64"})
    return low


def circulant_flow(run: Run) -> Outcome:
    """The pre-issue-13 method (kept selectable as ``strategy="circulant"``): circulant certificate with
    ``rho = rtol/4`` or a cheap bound over budget, Lanczos lower bound."""
    for exact in (circular_fft_exact, dense_exact):
        out = exact(run)
        if out is not None:
            return out
    chosen = run.opts["upper_method"]
    if chosen == "auto":
        chosen = "fft_cholesky" if run.seconds(run.plan["certificate_flops"]) <= run.budget else "singla_feizi"
    run.plan["chosen_upper"] = chosen
    if chosen == "fft_cholesky":
        upper, init = run_fft(run, run.rtol / 4)
    elif chosen in LADDER:
        low0 = lower_bound(run, None)
        upper, init = run_banded(run, chosen, low0.value, run.rtol / 4), low0.details["vector"]
    else:
        upper, init = run_cheap(run, chosen), None
    low = _circulant_lower(run, upper, lower_bound(run, init))
    low = refine_lower(run, low, upper.value, run.opts["max_refine"])
    if low.method != "fft_block_power":
        low = finalize_lower(run, low)
    return Outcome(low, upper, None, *diagnose(run, low, upper, rung_estimates_safe(run), []))


def rung_estimates_safe(run: Run) -> dict[str, float]:
    try:
        return rung_estimates(run)
    except ValueError:
        return {"fft_cholesky": run.seconds(run.plan["certificate_flops"])}


def _start(run: Run, est: dict[str, float]) -> list[str]:
    """Rungs to try, in order: forced method, or the ladder from the tightest rung whose estimate is within
    ``jump`` of the cheapest (a cheap bound first when even the cheapest is over budget)."""
    forced = run.opts["upper_method"]
    if forced != "auto":
        return [forced]
    rungs = [m for m in LADDER if m in est]
    start = max(i for i, m in enumerate(rungs) if est[m] <= run.opts["jump"] * est[rungs[0]])
    rungs = rungs[start:]
    if est[rungs[0]] > run.left():
        rungs = ["singla_feizi"] + rungs[1:]
    return rungs


def boundary_flow(run: Run) -> Outcome:
    """Exact shortcuts, then the ladder ``fft_cholesky -> axis_cholesky -> banded_cholesky`` (module doc)."""
    for exact in (pointwise_exact, circular_fft_exact, dense_exact, grouped_dense_exact):
        out = exact(run)
        if out is not None:
            return out
    rho = run.rtol * run.opts["rho_fraction"]
    est = rung_estimates(run)
    rungs = _start(run, est)
    run.plan["ladder"] = list(rungs)
    run.plan["chosen_upper"] = rungs[0]
    first = rungs[0]
    if first in LADDER[1:]:
        low = lower_bound(run, None)
        upper = run_banded(run, first, low.value, rho)
    elif first == "fft_cholesky" and len(rungs) > 1 and est[rungs[1]] <= run.left() and _boundary_heavy(run):
        # small maps: the circulant is often too loose for rtol; the lower bound runs between the fft rung's
        # sampled estimate and its factorisations, so the rung gives up when the ladder would replace its bound
        upper, low = _fft_or_give_up(run, rho)
    else:
        upper, init = run_fft(run, rho, estimator="lanczos", window=True) if first == "fft_cholesky" else \
            (run_cheap(run, first), None)
        low = _circulant_lower(run, upper, lower_bound(run, init, stall=True))
    if not upper.details.get("gave_up"):  # (a rung that gave up has refined the lower bound already)
        low = refine_lower(run, low, upper.value, _rounds(run, upper, low))
    emb = upper.details.get("embedding_lower", math.inf)
    if upper.method == "fft_cholesky" and upper.value > low.value * (1 + run.rtol) and \
            run.accept(low.value) > emb * (1 + 1e-4):
        # the circulant itself is good enough, only its rho-inflated certificate level is not: certify there
        upper = tighter(upper, run_fft(run, rho, accept=run.accept(low.value), estimator="lanczos")[0])
    skipped = []
    for method in rungs[1:]:
        if upper.value <= low.value * (1 + run.rtol):
            break
        if est.get(method, math.inf) > run.left():
            skipped.append(method)
            continue
        upper = tighter(upper, run_banded(run, method, low.value, rho))
        low = refine_lower(run, low, upper.value, _rounds(run, upper, low))
    if math.isinf(upper.value):  # the fft rung gave up and no later rung ran: certify the circulant after all
        upper = run_fft(run, rho, estimator="lanczos")[0]
    if low.method != "fft_block_power":
        low = finalize_lower(run, low)
    return Outcome(low, upper, None, *diagnose(run, low, upper, est, skipped))


def _fft_or_give_up(run: Run, rho: float) -> tuple[NormValue, NormValue]:
    """The fft rung with the lower bound taken from its sampled estimate's plane wave: no block is factorised
    when that estimate already exceeds ``lower (1 + rtol)`` (the value is then ``inf``, for a later rung)."""
    from spectral.circulant import plane_wave

    found: dict[str, NormValue] = {}

    def level(estimate: dict[str, Any]) -> float:  # zero padding only (_boundary_heavy): no padding-map factor
        init = plane_wave(run.op, estimate["argmax_frequency"], estimate["argmax_group"], estimate["argmax_vector"],
                          estimate["coarse_grid"], [p[0] for p in run.op.padding], window=True)
        low = lower_bound(run, init, stall=True)
        # refined while the estimate alone would make the rung give up (the refinement the flow runs anyway)
        found["low"] = low = refine_lower(run, low, estimate["circulant_lower"], run.opts["max_refine"])
        return low.value * (1 + run.rtol)

    upper, init = run_fft(run, rho, estimator="lanczos", give_up_above=level, window=True)
    return upper, found["low"] if "low" in found else lower_bound(run, init, stall=True)


BOUNDARY_HEAVY_GRID_RATIO = 1.2


def _boundary_heavy(run: Run) -> bool:
    """Whether the circulant grid is more than ``BOUNDARY_HEAVY_GRID_RATIO`` times the input's size (e.g. 9x9
    for 8x8 inputs: 1.27; 17x17 for 16x16: 1.13), where the circulant embedding is typically a few percent loose."""
    if run.op.padding_mode != "zeros":
        return False
    grid = certificate_grid(run.op)
    return math.prod(grid) > BOUNDARY_HEAVY_GRID_RATIO * math.prod(run.op.in_shape[1:])


def _rounds(run: Run, upper: NormValue, low: NormValue) -> int:
    """Refinement rounds for the lower bound: one when the upper bound's own embedding is the cause of the gap."""
    emb = upper.details.get("embedding_lower")
    if emb is not None and emb > low.value * (1 + run.rtol):
        return 1
    return run.opts["max_refine"]


def diagnose(run: Run, low: NormValue, upper: NormValue, est: dict[str, float],
             skipped: list[str]) -> tuple[str | None, str | None]:
    """Why the gap exceeds rtol and what would close it; (None, None) when it does not."""
    if low.value > 0 and upper.value <= low.value * (1 + run.rtol) or upper.value == 0:
        return None, None
    emb = upper.details.get("embedding_lower")
    if upper.method == "banded_cholesky" or (emb is not None and emb <= low.value * (1 + run.rtol / 2)):
        return ("the lower bound has not converged (the upper bound's own estimate is within rtol/2 of it)",
                "raise lower_iters or max_refine")
    if emb is not None:
        reason = (f"{upper.method} bounds an embedding of the layer whose norm is >= {emb:.6g}, "
                  f"{100 * (emb / low.value - 1):.2f}% above the lower bound")
    else:
        reason = f"{upper.method} is a loose bound (its cost estimate selected it within budget_seconds)"
    order = list(LADDER)
    pos = order.index(upper.method) + 1 if upper.method in order else 0
    nxt = [m for m in order[pos:] if m in est]
    if not nxt:
        return reason, "no tighter certificate applies to this layer"
    m = nxt[0]
    sugg = f"upper_method='{m}' (estimated {est[m]:.1f} s at {run.opts['assumed_flops_per_second']:.2g} flop/s)"
    if m in skipped or est[m] > run.left():
        sugg += f", over the remaining budget: raise budget_seconds (was {run.budget:g})"
    return reason, sugg
