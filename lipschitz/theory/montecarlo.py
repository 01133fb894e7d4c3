"""Monte Carlo checks of the random-matrix predictions against exact norms measured with ``spectral``.

``validate_conv_predictions``: sample kernels for a grid of shapes, measure the exact circular operator norm
(``spectral.exact.conv_operator_norm_circular``) and compare with the leading-order law and the Tracy-Widom
corrected prediction. ``validate_tail_bound``: empirical tail of s_max of Gaussian matrices against exp(-t^2/2).
"""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

from lipschitz.theory import random_matrix as rm

DEFAULT_SHAPES = (  # (c_out, c_in, kernel, input_size, stride)
    (16, 16, 3, 16, 1), (32, 32, 3, 16, 1), (64, 64, 3, 16, 1), (128, 128, 3, 16, 1),
    (64, 32, 3, 16, 1), (32, 64, 3, 16, 1), (64, 64, 1, 16, 1), (64, 64, 5, 16, 1), (64, 64, 3, 32, 1),
    (64, 32, 3, 16, 2), (64, 32, 1, 16, 2), (128, 64, 3, 16, 2),
)


def _shape_tuple(shape) -> tuple[int, int, int, int, int]:
    if isinstance(shape, dict):
        shape = (shape["c_out"], shape["c_in"], shape["kernel_size"], shape["input_size"], shape.get("stride", 1))
    if len(shape) == 4:
        shape = (*shape, 1)
    if len(shape) != 5 or any(not isinstance(v, int) or v < 1 for v in shape):
        raise ValueError(f"shape must be (c_out, c_in, kernel_size, input_size[, stride]) positive ints, got {shape!r}")
    return tuple(shape)


def validate_conv_predictions(shapes: Iterable = DEFAULT_SHAPES, *, init: str = "fixed", std: float = 1.0,
                              n_samples: int = 5, seed: int = 0, out_dir: str | Path | None = None,
                              progress: bool = True) -> list[dict]:
    """Predicted vs measured operator norms of iid kernels; one row per shape (means over ``n_samples`` draws).

    Columns: measured mean/std (exact circular norm via spectral), leading-order prediction, Tracy-Widom
    prediction, their relative errors (prediction/measured - 1). Writes ``theory_conv_predictions.{json,csv,png}``
    under ``out_dir`` when given.
    """
    from spectral.exact import conv_operator_norm_circular
    from tqdm import tqdm

    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    shapes = [_shape_tuple(s) for s in shapes]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for c_out, c_in, k, n, stride in tqdm(shapes, desc="conv predictions", disable=not progress):
        if n % stride:
            raise ValueError(f"input_size {n} must be divisible by stride {stride}")
        s = rm.init_std(init, c_out, c_in, k, std)
        t0 = time.process_time()
        values = [conv_operator_norm_circular(rm.sample_init(init, c_out, c_in, k, std=std, generator=gen), n,
                                              stride=stride).value for _ in range(n_samples)]
        measured = sum(values) / len(values)
        spread = math.sqrt(sum((v - measured) ** 2 for v in values) / max(1, len(values) - 1))
        lead = rm.conv_norm_prediction(c_out, c_in, k, s, n, stride, correction="none")
        tw = rm.conv_norm_prediction(c_out, c_in, k, s, n, stride, correction="tracy_widom")
        rows.append({
            "c_out": c_out, "c_in": c_in, "kernel_size": k, "input_size": n, "stride": stride, "init": init,
            "std": s, "n_samples": n_samples, "measured_mean": measured, "measured_std": spread,
            "measured_guarantee": "exact", "predicted_leading": lead.value, "predicted_tracy_widom": tw.value,
            "prediction_guarantee": tw.guarantee.value, "n_max": tw.details.get("n_max"),
            "rel_err_leading": lead.value / measured - 1, "rel_err_tracy_widom": tw.value / measured - 1,
            "cpu_seconds": time.process_time() - t0,
        })
    if out_dir is not None:
        write_rows(rows, Path(out_dir), "theory_conv_predictions")
        plot_conv_predictions(rows, Path(out_dir) / "theory_conv_predictions.png")
    return rows


def validate_tail_bound(rows: int = 64, cols: int = 32, t_values: Sequence[float] = (0.5, 1.0, 1.5, 2.0, 2.5),
                        n_samples: int = 2000, seed: int = 0) -> list[dict]:
    """Empirical P(s_max > sqrt(N)+sqrt(n)+t) for N(0,1) matrices (dense SVD) vs the bound exp(-t^2/2).

    Each row carries a one-sided 99.9% Hoeffding margin so that a test can compare without flakiness.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    gen = torch.Generator().manual_seed(seed)
    norms = []
    for start in range(0, n_samples, 500):
        b = min(500, n_samples - start)
        g = torch.randn(b, rows, cols, generator=gen, dtype=torch.float64)
        norms.append(torch.linalg.matrix_norm(g, ord=2))
    s_max = torch.cat(norms)
    edge = math.sqrt(rows) + math.sqrt(cols)
    margin = math.sqrt(math.log(1000.0) / (2 * n_samples))
    out = []
    for t in t_values:
        rate = float((s_max > edge + t).double().mean())
        out.append({"rows": rows, "cols": cols, "t": float(t), "violation_rate": rate,
                    "bound": rm.gaussian_tail_bound(float(t)), "hoeffding_margin_999": margin,
                    "n_samples": n_samples, "mean_s_max": float(s_max.mean()), "gordon_mean_bound": edge})
    return out


def write_rows(rows: list[dict], out_dir: Path, stem: str) -> None:
    """Write rows as ``stem.json`` and ``stem.csv`` under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    if rows:
        with open(out_dir / f"{stem}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            writer.writeheader()
            writer.writerows(rows)


def plot_conv_predictions(rows: list[dict], path: str | Path) -> Path:
    """Scatter of predicted vs measured norms (both predictions) with the identity line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    meas = [r["measured_mean"] for r in rows]
    ax1.scatter(meas, [r["predicted_leading"] for r in rows], label="leading order s k (sqrt(c_in)+sqrt(c_out))")
    ax1.scatter(meas, [r["predicted_tracy_widom"] for r in rows], marker="x", label="Tracy-Widom + max over freq.")
    lo, hi = min(meas) * 0.9, max(meas) * 1.1
    ax1.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax1.set_xlabel("measured exact circular norm (mean)")
    ax1.set_ylabel("predicted")
    ax1.legend(fontsize=7)
    labels = [f"{r['c_out']}x{r['c_in']}k{r['kernel_size']}s{r['stride']}" for r in rows]
    x = range(len(rows))
    ax2.bar([i - 0.2 for i in x], [100 * r["rel_err_leading"] for r in rows], width=0.4, label="leading")
    ax2.bar([i + 0.2 for i in x], [100 * r["rel_err_tracy_widom"] for r in rows], width=0.4, label="Tracy-Widom")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(labels, rotation=60, fontsize=7)
    ax2.set_ylabel("relative error (%)")
    ax2.axhline(0, color="k", lw=0.5)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
