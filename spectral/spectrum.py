"""Full singular-value spectra of conv and linear layers, compared with the random-matrix law of the same entry std.

``layer_spectrum(weight, input_shape, ...)`` returns the singular values of the layer's true operator at its input
size, by the cheapest exact route:

- circular padding: every singular value, exactly, by FFT block-diagonalisation (``spectral.exact``);
- small layers of any padding: every singular value, exactly, by a dense SVD of the unrolled operator;
- large zero/reflect/replicate-padded layers: the top ``k`` by Lanczos (``scipy.sparse.linalg.svds``, ARPACK;
  block subspace iteration where ARPACK fails). Those are Rayleigh-Ritz values: by Cauchy interlacing the i-th is
  at most the true i-th singular value, so they carry the ``lower`` label;
- linear layers: the SVD of the weight matrix (exact).

``compare_with_random(spectrum, weight, ...)`` sets it against the random-matrix picture of a kernel with iid
entries of the same standard deviation: the bulk edge (``spectral.random_matrix`` law, the same baseline as
``analyze``'s ``ratio_to_random``), how many singular values lie above it, and the heavy-tail exponent alpha of
the eigenvalues s^2 (power-law fit of Clauset, Shalizi & Newman 2009, the number weightwatcher reads from reshaped
weight matrices -- here from the true operator), next to the same numbers for one Gaussian draw of the same
shape and std through the same operator (the finite-size reference: a random layer has ~0 outliers and a large
alpha).

References: Sedghi, Gupta & Long 2019 (FFT spectra of circular convolutions); Marchenko & Pastur 1967; Clauset,
Shalizi & Newman 2009 (power-law MLE with KS-selected xmin); Martin & Mahoney 2021 (heavy-tailed self-
regularisation, the alpha metric).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from spectral.guarantee import Guarantee
from spectral.operators import LayerOperator, dense_matrix

__all__ = ["Spectrum", "PowerLawFit", "SpectrumComparison", "layer_spectrum", "linear_spectrum",
           "fit_power_law", "compare_with_random", "quantile_profile", "model_spectra", "DEFAULT_MAX_DENSE_ENTRIES"]

#: Largest unrolled operator (rows x cols) decomposed densely: 4M entries (32 MiB in float64, ~1 s SVD).
DEFAULT_MAX_DENSE_ENTRIES = 2**22


@dataclass(frozen=True)
class Spectrum:
    """Singular values (descending) of one operator; ``complete`` when all ``min(rows, cols)`` are present."""

    values: np.ndarray
    method: str
    guarantee: Guarantee
    rows: int
    cols: int
    complete: bool
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def top(self) -> float:
        return float(self.values[0]) if self.values.size else 0.0

    def to_dict(self, max_values: int | None = None) -> dict[str, Any]:
        values = self.values if max_values is None else self.values[:max_values]
        return {"values": [float(v) for v in values], "n_values": int(self.values.size), "method": self.method,
                "guarantee": self.guarantee.value, "rows": self.rows, "cols": self.cols, "complete": self.complete,
                "details": dict(self.details)}


@dataclass(frozen=True)
class PowerLawFit:
    """Power-law tail ``p(x) ~ x^-alpha`` for ``x >= xmin`` of a sample (here eigenvalues s^2); an ESTIMATE."""

    alpha: float | None
    xmin: float | None
    n_tail: int
    ks_distance: float | None
    n: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SpectrumComparison:
    """A layer's spectrum against the random-matrix law and a Gaussian draw with the same entry std."""

    entry_std: float
    bulk_edge: float
    top: float
    top_over_edge: float
    threshold: float
    n_outliers: int
    alpha: PowerLawFit
    random_top: float | None = None
    random_n_outliers: int | None = None
    random_alpha: PowerLawFit | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["alpha"] = self.alpha.to_dict()
        out["random_alpha"] = None if self.random_alpha is None else self.random_alpha.to_dict()
        out["guarantees"] = {"bulk_edge": "estimate", "threshold": "estimate", "alpha": "estimate",
                             "random_top": "estimate (one draw)"}
        return out


# ----------------------------------------------------------------------------------------------
# spectra
# ----------------------------------------------------------------------------------------------


def linear_spectrum(weight: torch.Tensor) -> Spectrum:
    """All singular values of a linear layer's ``(out, in)`` weight (exact)."""
    if not torch.is_tensor(weight) or weight.dim() != 2:
        raise ValueError(f"a linear weight must be a 2-D tensor (out_features, in_features), got "
                         f"{tuple(weight.shape) if torch.is_tensor(weight) else type(weight).__name__}")
    values = torch.linalg.svdvals(weight.detach().double()).cpu().numpy()
    return Spectrum(values, "svd_weight", Guarantee.EXACT, int(weight.shape[0]), int(weight.shape[1]), True)


def layer_spectrum(weight: torch.Tensor, input_shape: Sequence[int] | None = None, *, stride: int | Sequence[int] = 1,
                   padding: int | str | Sequence[int] = 0, padding_mode: str = "zeros",
                   dilation: int | Sequence[int] = 1, groups: int = 1, top_k: int = 64,
                   max_dense_entries: int = DEFAULT_MAX_DENSE_ENTRIES, seed: int = 0) -> Spectrum:
    """Singular values of a conv (weight ``(c_out, c_in/g, k..)``, ``input_shape`` ``(c_in, H, W)``) or linear layer.

    Circular padding: all values by FFT (exact); operators with at most ``max_dense_entries`` entries: all values by
    dense SVD (exact); otherwise the top ``top_k`` by Lanczos (``lower``: each <= the true value of its rank).
    """
    if not torch.is_tensor(weight):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() == 2:
        return linear_spectrum(weight)
    if input_shape is None:
        raise ValueError("a conv layer's spectrum needs its input_shape (C_in, H, W) at the size the layer sees")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    w = weight.detach().double()
    op = LayerOperator.conv(w, input_shape, stride, padding, dilation, groups, padding_mode)
    rows, cols = math.prod(op.out_shape), math.prod(op.in_shape)
    if padding_mode == "circular" and _circular_is_exact(op):
        from spectral.exact import conv_singular_values_circular

        values = conv_singular_values_circular(w, tuple(input_shape[1:]), stride=op.stride, dilation=op.dilation,
                                               groups=groups).cpu().numpy()
        return Spectrum(values, "fft_circular", Guarantee.EXACT, rows, cols, True)
    if rows * cols <= max_dense_entries:
        values = torch.linalg.svdvals(dense_matrix(op, max_entries=max_dense_entries)).cpu().numpy()
        return Spectrum(values, "dense_svd", Guarantee.EXACT, rows, cols, True)
    return _lanczos_top(op, rows, cols, top_k, seed)


def _circular_is_exact(op: LayerOperator) -> bool:
    """FFT spectra need the padded grid to equal the input grid ("same"-style padding) and stride | size."""
    kernel = op.weight.shape[2:]
    for n, (pl, pr), k, s, d in zip(op.in_shape[1:], op.padding, kernel, op.stride, op.dilation):
        if pl + pr != d * (k - 1) or n % s:
            return False
    return True


def _lanczos_top(op: LayerOperator, rows: int, cols: int, top_k: int, seed: int) -> Spectrum:
    """Top-k singular values by ARPACK on the operator's forward/adjoint (Rayleigh-Ritz: certified lower)."""
    from scipy.sparse.linalg import LinearOperator, svds

    k = min(top_k, min(rows, cols) - 1)

    def matvec(v: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.ascontiguousarray(v).reshape(1, *op.in_shape), dtype=torch.float64)
        return op.forward(x).reshape(-1).numpy()

    def rmatvec(v: np.ndarray) -> np.ndarray:
        y = torch.as_tensor(np.ascontiguousarray(v).reshape(1, *op.out_shape), dtype=torch.float64)
        return op.adjoint(y).reshape(-1).numpy()

    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence

    linop = LinearOperator((rows, cols), matvec=lambda v: matvec(v.ravel()), rmatvec=lambda v: rmatvec(v.ravel()),
                           dtype=np.float64)
    start = np.random.default_rng(seed).standard_normal(min(rows, cols))
    try:
        values = svds(linop, k=k, which="LM", return_singular_vectors=False, solver="arpack", v0=start, tol=1e-10)
    except (ArpackError, ArpackNoConvergence):
        # ARPACK fails when the Krylov space runs out (e.g. an operator with few distinct singular values)
        return _subspace_top(op, rows, cols, k, seed)
    values = np.sort(np.asarray(values, dtype=float))[::-1]
    return Spectrum(values, "lanczos_topk", Guarantee.LOWER, rows, cols, False,
                    {"k": int(k), "note": "Ritz values: the i-th is <= the true i-th singular value"})


def _subspace_top(op: LayerOperator, rows: int, cols: int, k: int, seed: int, iters: int = 40) -> Spectrum:
    """Top-k singular values by block subspace iteration: the singular values of ``A Q`` with ``Q`` orthonormal,
    each at most the true one of its rank (interlacing), so still certified lower bounds."""
    gen = torch.Generator().manual_seed(seed)
    width = min(cols, k + 8)
    q = torch.linalg.qr(torch.randn(cols, width, dtype=torch.float64, generator=gen)).Q
    with torch.no_grad():
        for _ in range(iters):
            y = op.forward(q.T.reshape(width, *op.in_shape)).reshape(width, -1)
            q = torch.linalg.qr(op.adjoint(y.reshape(width, *op.out_shape)).reshape(width, -1).T).Q
        b = op.forward(q.T.reshape(width, *op.in_shape)).reshape(width, -1)
    values = torch.linalg.svdvals(b).numpy()[:k]
    return Spectrum(values, "subspace_iteration_topk", Guarantee.LOWER, rows, cols, False,
                    {"k": int(k), "iterations": iters,
                     "note": "singular values of A Q (Q orthonormal): the i-th is <= the true i-th singular value"})


# ----------------------------------------------------------------------------------------------
# comparison with the random-matrix law
# ----------------------------------------------------------------------------------------------


def fit_power_law(sample: Sequence[float] | np.ndarray, *, min_tail: int = 10, max_xmin_quantile: float = 0.95) -> PowerLawFit:
    """Continuous power-law MLE ``alpha = 1 + n / sum log(x / xmin)`` with ``xmin`` minimising the KS distance.

    ``xmin`` ranges over the sample values that leave at least ``min_tail`` points above (and below the
    ``max_xmin_quantile`` quantile). Values equal to 1e-9 relative count once: an operator's spectrum repeats a
    value per frequency (a 1x1 convolution repeats every singular value of its matrix), which is multiplicity, not
    a heavier tail. Too few distinct positive values gives ``alpha=None`` with a note.
    References: Clauset, Shalizi & Newman 2009; Martin & Mahoney 2021 (alpha of weight-matrix spectra).
    """
    x = _distinct(np.asarray([v for v in np.asarray(sample, dtype=float).ravel() if np.isfinite(v) and v > 0]))
    n = int(x.size)
    if n < min_tail + 1:
        return PowerLawFit(None, None, 0, None, n, f"needs more than {min_tail} distinct positive values, got {n}")
    logs = np.log(x)
    cum = np.cumsum(logs[::-1])[::-1]  # cum[i] = sum_{j >= i} log x_j
    last = min(n - min_tail, max(1, int(max_xmin_quantile * n)))
    best: tuple[float, float, float, int] | None = None
    for i in range(0, last + 1):
        tail = n - i
        denom = cum[i] - tail * logs[i]
        if denom <= 0:
            continue
        alpha = 1.0 + tail / denom
        emp = np.arange(tail) / tail  # empirical CDF just below each tail point
        model = 1.0 - (x[i:] / x[i]) ** (1.0 - alpha)
        ks = float(np.max(np.maximum(np.abs(model - emp), np.abs(model - (emp + 1.0 / tail)))))
        if best is None or ks < best[0]:
            best = (ks, alpha, float(x[i]), tail)
    if best is None:
        return PowerLawFit(None, None, 0, None, n, "all candidate tails are constant")
    ks, alpha, xmin, tail = best
    return PowerLawFit(float(alpha), xmin, int(tail), ks, n)


def _distinct(x: np.ndarray, rtol: float = 1e-9) -> np.ndarray:
    """Sorted values with runs of equal values (to ``rtol``) collapsed to one."""
    x = np.sort(x)
    if x.size < 2:
        return x
    keep = np.concatenate([[True], np.diff(x) > rtol * np.abs(x[1:])])
    return x[keep]


def compare_with_random(spectrum: Spectrum, weight: torch.Tensor, input_shape: Sequence[int] | None = None, *,
                        stride: int | Sequence[int] = 1, padding: int | str | Sequence[int] = 0,
                        padding_mode: str = "zeros", dilation: int | Sequence[int] = 1, groups: int = 1,
                        bulk_edge: float | None = None, random_reference: bool = True, seed: int = 0,
                        top_k: int = 64, max_dense_entries: int = DEFAULT_MAX_DENSE_ENTRIES) -> SpectrumComparison:
    """``weight``'s spectrum against the random-matrix picture of iid entries with the same std.

    ``bulk_edge``: the law's largest singular value (default: ``spectral.random_matrix``'s baseline; callers with a
    sharper law pass it). With ``random_reference`` a Gaussian kernel of that std goes through the same operator
    (same padding, stride, input size); an *outlier* is a singular value above ``threshold = max(bulk_edge,
    random_top)``, so neither a law that is off for strided or tiny layers nor finite-size spill-over counts as
    structure. ``alpha`` is the power-law exponent of the eigenvalues s^2.
    """
    from spectral.random_matrix import random_conv_norm_prediction

    w = weight.detach()
    conv = w.dim() > 2
    law = random_conv_norm_prediction(w, None if input_shape is None else tuple(input_shape[1:]), stride, groups) \
        if conv else random_conv_norm_prediction(w)
    std = float(law.details["entry_std"])
    edge = float(law.value) if bulk_edge is None else float(bulk_edge)
    out: dict[str, Any] = {"entry_std": std, "bulk_edge": edge, "top": spectrum.top,
                           "top_over_edge": spectrum.top / edge if edge > 0 else math.inf,
                           "alpha": fit_power_law(spectrum.values ** 2)}
    threshold = edge
    if random_reference:
        gen = torch.Generator().manual_seed(seed)
        draw = torch.randn(w.shape, generator=gen, dtype=torch.float64) * std
        ref = layer_spectrum(draw, input_shape, stride=stride, padding=padding, padding_mode=padding_mode,
                             dilation=dilation, groups=groups, top_k=top_k, max_dense_entries=max_dense_entries,
                             seed=seed) if conv else linear_spectrum(draw)
        threshold = max(edge, ref.top)
        out.update(random_top=ref.top, random_n_outliers=int(np.sum(ref.values > edge)),
                   random_alpha=fit_power_law(ref.values ** 2))
    return SpectrumComparison(**out, threshold=threshold, n_outliers=int(np.sum(spectrum.values > threshold)))


def quantile_profile(values: np.ndarray, scale: float = 1.0, points: int = 48) -> list[list[float]]:
    """``[[rank fraction, value / scale], ...]``: a compact rank plot of a spectrum (the top 8 values kept exactly,
    then ``points`` log-spaced ranks), small enough to store per layer in a sweep record."""
    v = np.sort(np.asarray(values, dtype=float))[::-1]
    n = v.size
    if n == 0:
        return []
    ranks = set(range(min(8, n)))
    ranks |= {int(r) for r in np.unique(np.round(np.geomspace(1, n, points)) - 1)}
    scale = scale if scale > 0 else 1.0
    return [[(r + 0.5) / n, float(v[r] / scale)] for r in sorted(ranks)]


# ----------------------------------------------------------------------------------------------
# every layer of a model
# ----------------------------------------------------------------------------------------------


def model_spectra(model: torch.nn.Module, example_input: torch.Tensor, *, top_k: int = 64, seed: int = 0,
                  random_reference: bool = True, max_dense_entries: int = DEFAULT_MAX_DENSE_ENTRIES,
                  keep_values: int | None = None, edge_law: Callable[..., float] | None = None,
                  profile_points: int = 32, progress: bool = False) -> list[dict[str, Any]]:
    """Spectrum and random-matrix comparison of every conv/linear call of ``model`` at ``example_input``.

    Layers are found as in ``spectral.analyze`` (forward hooks, real input sizes, an eval-mode BatchNorm directly
    after a conv folded in). Each row: name, kind, weight_shape, input_shape, method, guarantee, n_values,
    ``values`` (all, or the first ``keep_values``), ``profile`` (``quantile_profile`` scaled by the bulk edge) and
    the ``comparison`` dict (``SpectrumComparison.to_dict``). ``edge_law(weight, input_shape, stride)`` gives the
    bulk edge (default: ``spectral.random_matrix``'s baseline; ``input_shape``/``stride`` are None for linear).
    """
    from torch import nn
    from tqdm.auto import tqdm

    from spectral.analyze import fold_batchnorm, record_layers

    rows = []
    for rec in tqdm(record_layers(model, example_input), desc="spectra", disable=not progress, leave=False):
        module = rec.module
        weight = module.weight.detach()
        if rec.bn_scale is not None:
            weight = fold_batchnorm(weight, rec.bn_scale)
        geometry: dict[str, Any] = {}
        if not isinstance(module, nn.Linear):
            geometry = {"stride": module.stride, "padding": module.padding, "padding_mode": module.padding_mode,
                        "dilation": module.dilation, "groups": module.groups}
            spec = layer_spectrum(weight, rec.input_shape, top_k=top_k, max_dense_entries=max_dense_entries,
                                  seed=seed, **geometry)
        else:
            weight = weight.reshape(weight.shape[0], -1)
            spec = linear_spectrum(weight)
        shape = None if isinstance(module, nn.Linear) else rec.input_shape
        edge = None if edge_law is None else edge_law(weight, shape, geometry.get("stride"))
        comparison = compare_with_random(spec, weight, shape, bulk_edge=edge,
                                         random_reference=random_reference, seed=seed, top_k=top_k,
                                         max_dense_entries=max_dense_entries, **geometry)
        row = {"name": rec.name, "kind": rec.kind, "weight_shape": list(weight.shape),
               "input_shape": list(rec.input_shape), "folded_batchnorm": rec.folded_batchnorm,
               **{k: v for k, v in spec.to_dict(keep_values).items() if k != "details"},
               "profile": quantile_profile(spec.values, comparison.bulk_edge, profile_points),
               "comparison": comparison.to_dict()}
        rows.append(row)
    return rows
