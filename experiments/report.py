"""Markdown reports with PNG plots, generated from a run directory's JSON results.

A run directory holds ``results.json`` (written by ``archlip demo`` and ``archlip sweep``) with a list of
*model records*, one per trained configuration, read as ``experiments.records.ModelRecord`` (missing keys are fine)::

    name, depths, widths, params, clean_acc, robust_acc, robust_attack, eps,
    certified_lipschitz (best certified l2 upper bound), certified_lipschitz_product,
    empirical_lipschitz (max per-sample Jacobian norm: a lower bound), attack_lipschitz (lower bound),
    searched_lipschitz (lipschitz.search over the input box: a lower bound),
    local_lipschitz (Yang et al. 2020 metric: an estimate), stable_acc, theory_prediction,
    stage_bounds {stage: value}, block_bounds {block: value}, node_lower {stage/block: lower bound of its own map},
    layers [per-layer rows of spectral.analyze], guarantees {key: label}

``write_report(run_dir)`` renders ``report.md`` plus PNG figures next to it. Each figure's caption
says the one command that regenerates it. Runs that only have ``spectral.json`` or ``bound.json``
(from ``archlip spectral/bound --out``) or per-run ``record.json`` files get a smaller report.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from experiments.io import run_file, write_text
from experiments.records import GUARANTEES, TABLE_COLUMNS, ModelRecord, as_records  # noqa: F401  (TABLE_COLUMNS re-exported)
from experiments.render import STAGE_COLOURS as _STAGE_COLOURS
from experiments.render import csv_header, write_csv  # noqa: F401  (write_csv re-exported)
from experiments.render import finite as _finite
from experiments.render import fmt as _fmt
from experiments.render import pyplot as _pyplot
from experiments.render import save_figure as _save
from experiments.render import value as _value

#: Guarantee label of each scalar column: the record's one map (experiments.records.GUARANTEES).
COLUMN_GUARANTEES: dict[str, str] = GUARANTEES

#: What weights a column describes, where that is not the trained model's own (shown in headers).
COLUMN_BASIS: dict[str, str] = {
    "theory_prediction": "a priori: iid random weights, not the trained ones",
    "theory_measured_norms": "theory rule with the trained layer norms",
}



# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """Read what a run directory holds into ``{"kind", "models", ...}``.

    Order of preference: ``results.json``; per-run ``runs/*/record.json`` (a sweep in progress; ``summary.json`` in
    sweeps written before);
    ``spectral.json`` / ``bound.json`` (single-model analyses).
    """
    run_dir = Path(run_dir)
    results_file = run_dir / "results.json"
    if results_file.is_file():
        results = _read_json(results_file)
        if not isinstance(results, dict) or "models" not in results:
            raise ValueError(f"{results_file} has no 'models' list; it was not written by archlip demo/sweep")
        return {**results, "models": as_records(results["models"])}
    runs = sorted(p for p in (run_dir / "runs").iterdir() if p.is_dir()) if (run_dir / "runs").is_dir() else []
    summaries = [path for path in (run_file(p, "record") for p in runs) if path.is_file()]
    if summaries:
        from experiments.study import analyse

        models = as_records(_read_json(p) for p in summaries)
        sweep_file = run_dir / "sweep.json"
        budget_groups = (_read_json(sweep_file).get("budget_groups") or []) if sweep_file.is_file() else []
        return {"kind": "sweep", "name": run_dir.name, "models": models, "study": analyse(models, budget_groups)}
    if (run_dir / "metrics.jsonl").is_file() and (run_dir / "resolved_config.yaml").is_file():
        return _training_results(run_dir)
    record: dict[str, Any] = {"name": run_dir.name}
    found = False
    if (run_dir / "spectral.json").is_file():
        spectral_payload = _read_json(run_dir / "spectral.json")
        if isinstance(spectral_payload, dict):
            spectral_payload = spectral_payload.get("layers", spectral_payload.get("rows"))
        if not isinstance(spectral_payload, list):
            raise ValueError(f"{run_dir / 'spectral.json'} has no layer rows; rewrite it with archlip spectral --out {run_dir}")
        record["layers"] = spectral_payload
        found = True
    if (run_dir / "bound.json").is_file():
        bound_payload = _read_json(run_dir / "bound.json")
        record.update({k: v for k, v in bound_payload.items() if k != "lower"})
        record.update(bound_payload.get("lower") or {})
        found = True
    if not found:
        raise FileNotFoundError(
            f"nothing to report in {run_dir}: expected results.json (archlip demo/sweep), runs/*/record.json, "
            f"spectral.json or bound.json (archlip spectral/bound --out {run_dir})"
        )
    return {"kind": "analysis", "name": run_dir.name, "models": [ModelRecord.from_dict(record)]}


def _training_results(run_dir: Path) -> dict[str, Any]:
    """A training run folder (``archlip train --out``): its summary, architecture and per-epoch metrics."""
    from experiments.io import read_jsonl

    summary_file = run_file(run_dir, "train_summary")
    summary = _read_json(summary_file) if summary_file.is_file() else {}
    arch: dict[str, Any] = {}
    for sidecar in ("model_final.json", "model_best.json"):
        if (run_dir / sidecar).is_file():
            arch = _read_json(run_dir / sidecar).get("arch") or {}
            break
    train = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) and k != "out_dir"}
    train.update({k: v for k, v in (summary.get("final_val") or {}).items() if isinstance(v, (int, float))})
    selection = summary.get("selection") or {}
    if selection.get("metric"):
        train["selection_metric"], train["selected_epoch"] = selection["metric"], selection.get("best_epoch")
    name = str(summary.get("name", run_dir.name))
    record = ModelRecord.from_dict({"name": name, "depths": arch.get("depths"), "widths": arch.get("widths"), "train": train})
    status = summary.get("status", f"in progress (no {summary_file.name} yet)")
    return {"kind": "training", "name": name, "models": [record], "metrics": read_jsonl(run_dir / "metrics.jsonl"),
            "description": f"Training run in {run_dir}: {status}, {summary.get('epochs_completed', '?')} of "
                           f"{summary.get('epochs', '?')} epochs. Evaluate its model with `archlip eval` and bound it "
                           f"with `archlip bound` for robustness and Lipschitz numbers."}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); delete it and rerun the step that wrote it") from None


# ----------------------------------------------------------------------------------------------
# pure helpers
# ----------------------------------------------------------------------------------------------


def stage_of(layer_name: str) -> str:
    """Stage label of a layer from its module name: ``stem``, ``stage1``.., ``head`` or ``other``.

    Understands RobustWideResNet (``blocks.{i}``, 0-based), the classic layout (``block{i}``, 1-based),
    ResNet (``layer{i}``, 1-based) and ``stages.{i}`` (0-based).
    """
    name = layer_name.lower()
    for pattern, offset in ((r"(?:^|\.)blocks\.(\d+)", 1), (r"(?:^|\.)stages?\.(\d+)", 1),
                            (r"(?:^|\.)block(\d+)", 0), (r"(?:^|\.)layer(\d+)", 0)):
        match = re.search(pattern, name)
        if match:
            return f"stage{int(match.group(1)) + offset}"
    last = name.split(".")[-1] if "." in name else name
    if name.startswith(("stem", "conv1")) or last in ("stem_conv", "conv1", "conv"):
        return "stem"
    if name.startswith(("fc", "linear", "head", "classifier")):
        return "head"
    return "other"


def spearman(xs: Sequence[float], ys: Sequence[float]) -> dict[str, Any]:
    """Spearman rank correlation of paired finite values, with the count used; ``rho`` None below 3 pairs
    (``experiments.stats.rank_correlation`` without its bootstrap interval)."""
    from experiments.stats import rank_correlation

    c = rank_correlation(xs, ys, n_resamples=0)
    out = {"rho": c.rho, "p_value": c.p_value, "n": c.n}
    if c.note:
        out["note"] = c.note
    return out


def correlations(models: Sequence[ModelRecord | dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rank correlations of robustness with the theory's prediction and the measured Lipschitz values.

    A lower predicted/measured Lipschitz constant is expected to go with HIGHER robust accuracy,
    so agreement shows as a negative rho.
    """
    models = as_records(models)
    robust = [m.robust_acc for m in models]
    out = {}
    for key in ("theory_prediction", "certified_lipschitz", "empirical_lipschitz", "local_lipschitz", "params"):
        out[f"{key}~robust_acc"] = spearman([m.get(key) for m in models], robust)
    out["theory_prediction~certified_lipschitz"] = spearman(
        [m.theory_prediction for m in models], [m.certified_lipschitz for m in models]
    )
    return out


def ranking(models: Sequence[ModelRecord | dict[str, Any]], key: str, descending: bool = False) -> str:
    """``"a (1.2) < b (3.4)"``-style order of the models by ``key``; equal values are shown as ties (``=``)."""
    pairs = sorted(((float(m.get(key)), str(m.get("name", ""))) for m in as_records(models) if _finite(m.get(key))),
                   reverse=descending)
    if not pairs:
        return ""
    out = f"{pairs[0][1]} ({_fmt(pairs[0][0])})"
    for (prev, _), (value, name) in zip(pairs, pairs[1:]):
        tie = math.isclose(prev, value, rel_tol=1e-9, abs_tol=1e-12)
        out += (" = " if tie else (" > " if descending else " < ")) + f"{name} ({_fmt(value)})"
    return out


def table_rows(models: Iterable[ModelRecord | dict[str, Any]]) -> list[dict[str, Any]]:
    """The aggregate table: one row per model with the scalar columns of ``TABLE_COLUMNS``."""
    return [{c: m.get(c) for c in TABLE_COLUMNS} for m in as_records(models)]


def _last_width(m: ModelRecord) -> float | None:
    widths = m.widths
    return float(widths[-1]) if isinstance(widths, (list, tuple)) and widths else None


# ----------------------------------------------------------------------------------------------
# plots (matplotlib, Agg backend selected inside each function)
# ----------------------------------------------------------------------------------------------

def plot_layer_norms(models: Sequence[ModelRecord | dict[str, Any]], path: str | Path, max_models: int = 16,
                     per_row: int = 4) -> Path | None:
    """Per-layer certified upper and lower bounds (and the random-matrix baseline), coloured by stage: one panel
    per model, ``per_row`` panels a row; beyond ``max_models`` the title says how many are shown and which not."""
    all_with_layers = [m for m in as_records(models) if m.layers]
    with_layers = all_with_layers[:max_models]
    if not with_layers:
        return None
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    ncols = min(per_row, len(with_layers))
    nrows = math.ceil(len(with_layers) / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows + 0.6), squeeze=False, sharey=True)
    axes = [list(grid.flat)]
    for ax in axes[0][len(with_layers):]:
        ax.set_visible(False)
    stages_seen: list[str] = []
    values: list[float] = []
    for ax, model in zip(axes[0], with_layers):
        for i, row in enumerate(model.layers):
            stage = stage_of(str(row.get("name", "")))
            if stage not in stages_seen:
                stages_seen.append(stage)
            colour = _STAGE_COLOURS.get(stage, "#8c564b")
            upper, lower, base = _value(row.get("upper")), _value(row.get("lower")), _value(row.get("random_baseline"))
            if upper is not None:
                ax.scatter([i], [upper], marker="v", color=colour, s=34, zorder=3)
                values.append(upper)
            if lower is not None:
                ax.scatter([i], [lower], marker="^", color=colour, s=22, facecolors="none", zorder=3)
                values.append(lower)
            if upper is not None and lower is not None:
                ax.plot([i, i], [lower, upper], color=colour, lw=1.0)
            if base is not None:
                ax.scatter([i], [base], marker="x", color="#777777", s=20, zorder=2)
                values.append(base)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (forward order)")
        ax.set_title(str(model.get("name", "")), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 20:
        for ax in axes[0]:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
    for row in grid:
        row[0].set_ylabel("l2 operator norm")
    handles = [Line2D([], [], ls="", marker="s", color=_STAGE_COLOURS.get(s, "#8c564b"), label=s) for s in stages_seen]
    handles += [Line2D([], [], ls="", marker="v", color="k", label="certified upper"),
                Line2D([], [], ls="", marker="^", color="k", markerfacecolor="none", label="lower"),
                Line2D([], [], ls="", marker="x", color="#777777", label="random-matrix baseline")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    title = "per-layer spectral norms by stage"
    if len(all_with_layers) > len(with_layers):
        rest = [str(m.get("name", "?")) for m in all_with_layers[len(with_layers):]]
        title += (f" ({len(with_layers)} of {len(all_with_layers)} runs shown; not shown: {', '.join(rest[:6])}"
                  f"{' ...' if len(rest) > 6 else ''}; per-layer tables in report.md)")
    fig.suptitle(title, fontsize=10)
    height = 4.0 * nrows + 0.6
    fig.tight_layout(rect=(0, 0.6 / height, 1, 1 - 0.3 / height))
    return _save(fig, plt, path)


def plot_certified_vs_empirical(models: Sequence[ModelRecord | dict[str, Any]], path: str | Path,
                                max_models: int = 12) -> Path | None:
    """Grouped bars (log scale): certified upper bounds against data/attack lower bounds per model."""
    keys = [("certified_lipschitz_product", "certified upper (layer product)", "#9467bd"),
            ("certified_lipschitz", "certified upper (best)", "#1f77b4"),
            ("empirical_lipschitz", "lower: max Jacobian norm on data", "#2ca02c"),
            ("attack_lipschitz", "lower: attack ratio", "#ff7f0e")]
    chosen = [m for m in as_records(models) if any(_finite(m.get(k)) for k, _, _ in keys)][:max_models]
    present = [(k, lab, c) for k, lab, c in keys if any(_finite(m.get(k)) for m in chosen)]
    if not chosen or not present:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.5, 1.6 * len(chosen) + 2), 4.6))
    width = 0.8 / len(present)
    for j, (key, label, colour) in enumerate(present):
        xs, heights = [], []
        for i, m in enumerate(chosen):
            if _finite(m.get(key)) and m.get(key) > 0:
                xs.append(i + (j - (len(present) - 1) / 2) * width)
                heights.append(m.get(key))
        bars = ax.bar(xs, heights, width=width, color=colour, label=label)
        for bar, h in zip(bars, heights):
            label = f"{h:,.0f}" if 100 <= h < 1e6 else f"{h:.3g}"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(chosen)))
    ax.set_xticklabels([str(m.get("name", i)) for i, m in enumerate(chosen)], fontsize=8)
    ax.set_ylabel("l2 Lipschitz constant of the logits")
    ax.set_title("certified upper bounds vs empirical lower bounds (truth lies between)", fontsize=10)
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 2.5)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, plt, path)


def _series_key(m: ModelRecord) -> str:
    """What stays fixed when only the last-stage width changes: the depths and the other widths."""
    depths = "-".join(map(str, m.depths or [])) or "?"
    widths = m.widths or []
    return f"depths {depths}, widths {'-'.join(map(str, widths[:-1]))}-*" if widths else f"depths {depths}"


def _binomial_yerr(members: Sequence[ModelRecord], y_key: str) -> list[list[float]] | None:
    """Error bars of accuracies: each run's 95% Clopper-Pearson interval over its test points (None when a run
    does not say how many points it used). Seed-to-seed variation is not in them."""
    from experiments.stats import accuracy_interval
    from experiments.study import eval_points

    rows = [m for m in members if _finite(m.get(y_key))]
    counts = [eval_points(m) for m in rows]
    if not rows or any(not n for n in counts):
        return None
    cis = [accuracy_interval(float(m.get(y_key)), n) for m, n in zip(rows, counts)]
    return [[float(m.get(y_key)) - ci.low for m, ci in zip(rows, cis)],
            [ci.high - float(m.get(y_key)) for m, ci in zip(rows, cis)]]


def plot_scatter(models: Sequence[ModelRecord | dict[str, Any]], x_key: str, path: str | Path, *, xlabel: str,
                 title: str, logx: bool = False, y_keys: Sequence[str] = ("robust_acc", "clean_acc")) -> Path | None:
    """Accuracy (robust filled, clean hollow) against one property of each model.

    For ``x_key="last_width"`` models that differ only in the last-stage width are joined by a line (one
    series per depth/width setting); otherwise points are not joined. With few points each is labelled.
    """
    def x_of(m: ModelRecord) -> float | None:
        return _last_width(m) if x_key == "last_width" else (float(m.get(x_key)) if _finite(m.get(x_key)) else None)

    points = [m for m in as_records(models) if x_of(m) is not None and _finite(m.get(y_keys[0]))]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    series: dict[str, list[ModelRecord]] = {}
    for m in points:
        series.setdefault(_series_key(m) if x_key == "last_width" else "all", []).append(m)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (key, members) in enumerate(series.items()):
        members = sorted(members, key=x_of)
        colour = "#d62728" if len(series) == 1 else colours[index % len(colours)]
        joined = x_key == "last_width" and len(members) > 1
        for y_key in y_keys:
            pts = [(x_of(m), float(m.get(y_key))) for m in members if _finite(m.get(y_key))]
            if not pts:
                continue
            robust = y_key == y_keys[0]
            label = ("robust accuracy" if robust else "clean accuracy") if len(series) == 1 else (
                f"{key} ({'robust' if robust else 'clean'})")
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=_binomial_yerr(members, y_key),
                        marker="o" if robust else "s", ls=(":" if joined else ""), capsize=3,
                        color=colour if robust or len(series) > 1 else "#1f77b4",
                        markerfacecolor=None if robust else "none", label=label)
        if len(points) <= 4:
            for m in members:
                ax.annotate(str(m.get("name", "")), (x_of(m), m.get(y_keys[0])), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
    if logx:
        ax.set_xscale("log")
    elif x_key == "last_width":
        xs = sorted({x_of(m) for m in points})
        if len(xs) <= 8:
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.margins(x=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_training_curves(rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Loss and accuracies per epoch of a training run (``metrics.jsonl`` rows)."""
    rows = [r for r in rows if _finite(r.get("epoch"))]
    if not rows:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    epochs = [r["epoch"] + 1 for r in rows]
    losses = [(e, r["train_loss"]) for e, r in zip(epochs, rows) if _finite(r.get("train_loss"))]
    if losses:  # a diverged epoch's loss (null, or "inf" in the JSON) is left out, not plotted as text
        left.plot([p[0] for p in losses], [p[1] for p in losses], marker="o", color="#1f77b4")
    left.set_xlabel("epoch")
    left.set_ylabel("training loss")
    for key, label, style in (("train_clean_acc", "train clean", "s:"), ("train_adv_acc", "train adversarial", "o:"),
                              ("val_clean_acc", "validation clean", "s-"), ("val_pgd_acc", "validation PGD", "o-")):
        points = [(e, r[key]) for e, r in zip(epochs, rows) if _finite(r.get(key))]
        if points:
            right.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
    right.set_xlabel("epoch")
    right.set_ylabel("accuracy")
    right.set_ylim(0, 1)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
    fig.suptitle("training curves", fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path)


def make_figures(models: Sequence[ModelRecord | dict[str, Any]], out_dir: str | Path, sweep: bool = False,
                 metrics: Sequence[dict[str, Any]] | None = None, per_run_scatter: bool = True) -> dict[str, Path]:
    """Write every figure the records support (and the training curves of ``metrics`` rows); {figure key: path}.

    ``per_run_scatter=False`` leaves out the one-point-per-run accuracy plots (a multi-seed study plots
    configuration means with intervals instead, ``experiments.study_report``).
    """
    out_dir, models = Path(out_dir), as_records(models)
    figures: dict[str, Path | None] = {
        "training_curves": plot_training_curves(metrics, out_dir / "training_curves.png") if metrics else None,
        "layer_norms": plot_layer_norms(models, out_dir / "layer_norms.png"),
        "certified_vs_empirical": plot_certified_vs_empirical(models, out_dir / "certified_vs_empirical.png"),
    }
    if per_run_scatter:
        figures["robustness_vs_last_width"] = plot_scatter(models, "last_width", out_dir / "robustness_vs_last_width.png",
                                                           xlabel="last-stage width", title="robustness vs last-stage width")
    if per_run_scatter and (sweep or len(models) > 2):
        figures["robustness_vs_params"] = plot_scatter(models, "params", out_dir / "robustness_vs_params.png",
                                                       xlabel="parameters", title="robustness vs parameter count", logx=True)
        figures["robustness_vs_certified"] = plot_scatter(models, "certified_lipschitz", out_dir / "robustness_vs_certified.png",
                                                          xlabel="certified l2 Lipschitz upper bound", logx=True,
                                                          title="robustness vs certified Lipschitz bound")
        figures["robustness_vs_empirical"] = plot_scatter(models, "empirical_lipschitz", out_dir / "robustness_vs_empirical.png",
                                                          xlabel="empirical Lipschitz lower bound (max Jacobian norm)", logx=True,
                                                          title="robustness vs empirical Lipschitz")
        figures["robustness_vs_theory"] = plot_scatter(models, "theory_prediction", out_dir / "robustness_vs_theory.png",
                                                       xlabel="theory's a-priori bound (iid random weights, not trained)",
                                                       logx=True, title="robustness vs the theory's a-priori prediction")
    return {k: v for k, v in figures.items() if v is not None}


# ----------------------------------------------------------------------------------------------
# training histories (metrics.jsonl)
# ----------------------------------------------------------------------------------------------

HISTORY_FILE = "metrics.jsonl"
# (key, label, line style) per panel; missing keys are skipped
_HISTORY_PANELS = (
    ("accuracy", (("val_clean_acc", "val clean", "-"), ("val_pgd_acc", "val PGD (selection)", "--"),
                  ("val_hist_pgd_acc", "val PGD (history)", "-."), ("val_hist_stable_acc", "val stable", ":"),
                  ("train_adv_acc", "train adversarial", (0, (1, 3))))),
    ("local Lipschitz (estimate)", (("val_hist_local_lipschitz", "at the PGD examples", "-"),
                                    ("val_hist_yang_lipschitz", "Yang et al. metric", "--"))),
    ("learning rate", (("lr", "lr", "-"),)),
)


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The per-epoch rows of a training run's ``metrics.jsonl`` (a cut last line is skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "epoch" in row:
            rows.append(row)
    return rows


def find_histories(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Training histories under ``run_dir``: a training run folder itself, or the runs of a demo or sweep."""
    run_dir = Path(run_dir)
    if (run_dir / HISTORY_FILE).is_file():
        return {run_dir.name: read_history(run_dir / HISTORY_FILE)}
    paths = sorted(run_dir.glob(f"runs/*/train/{HISTORY_FILE}")) + sorted(run_dir.glob(f"*/train/{HISTORY_FILE}"))
    return {p.parent.parent.name: rows for p in paths if (rows := read_history(p))}


def plot_history(histories: Mapping[str, Sequence[dict[str, Any]]], path: str | Path) -> Path | None:
    """Per-epoch curves: accuracies (validation clean / PGD / stable, training adversarial), the local Lipschitz
    estimate and the learning rate; one line style per quantity, and one colour per run (per quantity when
    there is a single run)."""
    panels = [(title, [(k, label, ls) for k, label, ls in series
                       if any(_finite(r.get(k)) for rows in histories.values() for r in rows)])
              for title, series in _HISTORY_PANELS]
    panels = [(title, series) for title, series in panels if series]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, series) in zip(axes[0], panels):
        for i, (name, rows) in enumerate(histories.items()):
            for j, (key, label, style) in enumerate(series):
                points = [(r["epoch"], r[key]) for r in rows if _finite(r.get(key))]
                if points:
                    xs, ys = zip(*points)
                    colour = colours[(j if len(histories) == 1 else i) % len(colours)]  # one run: by quantity
                    ax.plot(xs, ys, linestyle=style, color=colour, marker="." if len(xs) < 30 else None,
                            label=label if len(histories) == 1 else f"{name}: {label}")
        ax.set_title(title)
        ax.set_xlabel("epoch (from 0, as in metrics.jsonl)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, path)


# ----------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------

_CAPTIONS = {
    "training_curves": "Training loss (left) and accuracies (right) per epoch; validation accuracies are on the split held out of the training data.",
    "layer_norms": "Per-layer l2 operator norms by stage: certified upper bound (v) and lower bound (^) of each conv/linear layer at its real input size (eval-mode BatchNorm directly after a conv folded in), and the random-matrix baseline (x) of a kernel with the same entry std.",
    "certified_vs_empirical": "Network l2 Lipschitz constant: certified upper bounds (layer product, and the best composition) against lower bounds measured on data; the true constant lies between.",
    "robustness_vs_last_width": "Clean and robust accuracy against the width of the last stage Bars: 95% Clopper-Pearson interval over the test points of each run (seed-to-seed variation not included).",
    "spectra": "Full singular-value spectra of every layer of the first model (exact: FFT or dense SVD; top-k by Lanczos for large layers), scaled by the random-matrix bulk edge of iid weights with the same entry std: trained weights (solid) against the model's initial weights (dashed).",
    "robustness_vs_params": "Robust accuracy against parameter count Bars: 95% Clopper-Pearson interval over the test points of each run (seed-to-seed variation not included).",
    "robustness_vs_certified": "Robust accuracy against the certified Lipschitz upper bound Bars: 95% Clopper-Pearson interval over the test points of each run (seed-to-seed variation not included).",
    "robustness_vs_empirical": "Robust accuracy against the empirical Lipschitz lower bound Bars: 95% Clopper-Pearson interval over the test points of each run (seed-to-seed variation not included).",
    "robustness_vs_theory": "Robust accuracy against the theory's a-priori Lipschitz bound (iid random weights with std 0.05: a prediction made without the trained weights).",
    "training_history": "Per-epoch training history (metrics.jsonl): validation clean, PGD and stable accuracy, the local "
                        "Lipschitz ratio at the PGD examples (an estimate), and the learning rate.",
}


def block_tightness_lines(models: Sequence[ModelRecord | dict[str, Any]]) -> list[str]:
    """Per-block tightness: each stage's and block's certified bound next to the lower bound of its own map."""
    lines: list[str] = []
    for m in as_records(models):
        lower = m.node_lower or {}
        certified = {**(m.stage_bounds or {}), **(m.block_bounds or {})}
        names = [n for n in certified if _finite(_value(certified[n])) and _finite(lower.get(n))]
        if not names:
            continue
        if not lines:
            lines += ["## Per-block tightness", "",
                      "Each stage's and block's certified bound (certified_upper) beside a lower bound of the Lipschitz "
                      "constant of that node's own map (lower: Jacobian norms searched from the inputs that reach it); "
                      "the network row compares the network's certified bound with its largest lower bound. Where "
                      "every node is tight but the network is not, the loss is in the composition.", ""]
        lines += [f"**{m.get('name', '')}**", "", "| node | certified_upper | lower | certified / lower |", "|---|---|---|---|"]
        net_lower = max((m.get(k) for k in ("empirical_lipschitz", "attack_lipschitz", "searched_lipschitz")
                         if _finite(m.get(k))), default=None)
        rows = [("network", m.certified_lipschitz, net_lower)] + [(n, _value(certified[n]), lower[n]) for n in names]
        for name, up, low in rows:
            ratio = f"{up / low:.3g}" if _finite(up) and _finite(low) and low > 0 else "-"
            lines.append(f"| {name} | {_fmt(up)} | {_fmt(low)} | {ratio} |")
        lines.append("")
    return lines


def render_markdown(results: dict[str, Any], figures: dict[str, Path], report_dir: Path, regenerate: str) -> str:
    """The report text: summary table, stage bounds, correlations, figures with captions, provenance."""
    models = as_records(results.get("models", []))
    kind = results.get("kind", "run")
    lines = [f"# archlip {kind} report: {results.get('name', report_dir.name)}", ""]
    if results.get("description"):
        lines += [str(results["description"]), ""]
    lines += [f"Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}. Regenerate this report and its figures with `{regenerate}`.", ""]
    lines += ["Guarantee of each number: `certified_upper` (a proven upper bound), `lower` (a proven lower bound: "
              "the true value is at least this), `estimate` (no guarantee either way), `attack_upper_bound` (robust "
              "accuracy under the attacks run: the true robust accuracy on those points is at most this). "
              "See docs/index.md.", ""]

    study = results["study"] if _has_seeds(results) else None
    if study is not None:  # a multi-seed study: its tests first, the per-run data after
        from experiments.study_report import study_markdown

        lines += study_markdown(study, models, {k: v for k, v in figures.items() if k.startswith("study_")},
                                report_dir, regenerate)
        figures = {k: v for k, v in figures.items() if not k.startswith("study_")}
    lines += _results_lines(models, study is not None)
    lines += _training_lines(models)
    lines += _stage_lines(models)
    lines += block_tightness_lines(models)
    if study is None:
        lines += theory_lines(models)
    lines += _tightness_lines(models)
    corr = results.get("correlations") or (correlations(models) if len(models) >= 3 else None)
    if study is None and corr:
        lines += _correlation_lines(corr)
    lines += _figure_lines(figures, report_dir, regenerate)
    lines += _layer_lines(models, study is not None)
    missing = [(m.name, step, why) for m in models for step, why in (m.unavailable or {}).items()]
    if missing:
        lines += ["## Not measured", "", "These steps could not run in this installation:", ""]
        lines += [f"- {name}: {step} ({why})" for name, step, why in missing] + [""]
    provenance = results.get("provenance")
    if provenance:
        lines += ["## Provenance", ""] + [f"- {k}: {_fmt(v)}" for k, v in provenance.items()] + [""]
    return "\n".join(lines)


def _results_lines(models: Sequence[ModelRecord], is_study: bool) -> list[str]:
    """The aggregate table (one row per model or run), headers labelled with guarantees, and the attack used."""
    rows = table_rows(models)
    shown = [c for c in TABLE_COLUMNS if any(r.get(c) is not None for r in rows)]
    if not (rows and shown):
        return []
    lines = ["## Results" + (" (one row per run)" if is_study else ""), ""]
    header = [f"{c} ({'; '.join(x for x in (COLUMN_GUARANTEES.get(c), COLUMN_BASIS.get(c)) if x)})"
              if c in COLUMN_GUARANTEES else c for c in shown]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in shown) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in shown) + " |" for r in rows]
    lines.append("")
    eps = {m.eps for m in models if m.eps is not None}
    if eps:
        lines += [f"Robust accuracy: attack `{models[0].get('robust_attack', '?')}` at linf eps = {', '.join(_fmt(e) for e in eps)}"
                  f"{'; ' + str(models[0].eval_points) if models[0].eval_points else ''}.", ""]
    return lines


def _training_lines(models: Sequence[ModelRecord]) -> list[str]:
    trained = [m for m in models if isinstance(m.train, dict) and m.train]
    if not trained:
        return []
    lines = ["## Training", "",
             "| model | recipe | method | epochs | seconds | val clean acc | val PGD acc | selection |",
             "|---|---|---|---|---|---|---|---|"]
    for m in trained:
        t = m.train
        selection = f"{t.get('selection_metric')} (epoch {t.get('selected_epoch')})" if t.get("selection_metric") else "-"
        if t.get("measured_checkpoint"):
            selection += f"; measured: {t['measured_checkpoint']}"
        lines.append(f"| {m.name} | {_fmt(m.get('recipe', t.get('name')))} | {_fmt(t.get('method'))} | "
                     f"{_fmt(t.get('epochs_completed'))} | {_fmt(t.get('seconds'))} | {_fmt(t.get('val_clean_acc'))} | "
                     f"{_fmt(t.get('val_pgd_acc'))} | {selection} |")
    return lines + ["", "Validation accuracies are on a split held out of the training data (model selection never sees the test set).", ""]


def _stage_lines(models: Sequence[ModelRecord]) -> list[str]:
    stage_models = [m for m in models if m.stage_bounds]
    if not stage_models:
        return []
    stages = sorted({s for m in stage_models for s in m.stage_bounds})
    lines = ["## Certified per-stage bounds (certified_upper)", "",
             "| model | " + " | ".join(stages) + " |", "|---|" + "|".join("---" for _ in stages) + "|"]
    lines += [f"| {m.get('name', '')} | " + " | ".join(_fmt(_value(m.stage_bounds.get(s))) for s in stages) + " |" for m in stage_models]
    return lines + [""]


def _tightness_lines(models: Sequence[ModelRecord]) -> list[str]:
    tight = [m for m in models if _finite(m.certified_lipschitz) and _finite(m.empirical_lipschitz)
             and m.empirical_lipschitz > 0]
    if not tight:
        return []
    lines = ["## How tight is the certificate", "",
             "The true l2 Lipschitz constant lies between the data lower bound and the certified upper bound.", ""]
    for m in tight:
        ratio = m.certified_lipschitz / m.empirical_lipschitz
        product = m.certified_lipschitz_product
        extra = (f"; the plain layer product ({_fmt(product)}) is {product / m.certified_lipschitz:.3g}x looser than the best composition"
                 if _finite(product) and m.certified_lipschitz > 0 else "")
        lines.append(f"- {m.name}: {_fmt(m.empirical_lipschitz)} <= L <= {_fmt(m.certified_lipschitz)} "
                     f"(ratio {ratio:.3g}){extra}.")
    return lines + [""]


def _correlation_lines(corr: Mapping[str, Any]) -> list[str]:
    lines = ["## Rank correlations (Spearman)", "",
             "A lower Lipschitz value should go with higher robustness: agreement shows as a negative rho. "
             "One run per model: these correlations mix configuration effects with seed noise.", "",
             "| pair | rho | p-value | n |", "|---|---|---|---|"]
    for pair, c in corr.items():
        lines.append(f"| {pair} | {_fmt(c.get('rho'))} | {_fmt(c.get('p_value'))} | {c.get('n')}"
                     f"{' (' + c['note'] + ')' if c.get('note') else ''} |")
    return lines + [""]


def _figure_lines(figures: dict[str, Path], report_dir: Path, regenerate: str) -> list[str]:
    if not figures:
        return []
    lines = ["## Figures", ""]
    for key, path in figures.items():
        rel = Path(path).resolve().relative_to(report_dir.resolve()) if Path(path).resolve().is_relative_to(report_dir.resolve()) else Path(path)
        lines += [f"![{key}]({rel.as_posix()})", "", f"*{_CAPTIONS.get(key, key)}* Regenerate: `{regenerate}`.", ""]
    return lines


def _layer_lines(models: Sequence[ModelRecord], is_study: bool) -> list[str]:
    """One per-layer sandwich table per model (a study: per configuration, its first seed)."""
    lines: list[str] = []
    shown_configs: set[str] = set()
    for m in models:
        config = str(m.config_id or m.name)
        if is_study and config in shown_configs:
            continue
        shown_configs.add(config)
        if not m.layers:
            continue
        lines += [f"## Per-layer sandwich: {m.get('name', '')}", "",
                  "Certified lower and upper bounds of each layer's l2 operator norm at its input size; gap = upper/lower - 1; "
                  "x random = upper bound / random-matrix baseline (a random kernel with the same entry std; an estimate).", "",
                  "| layer | stage | weight | input | lower | upper | gap | x random | upper method |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in m.layers:
            lines.append(f"| {row.get('name', '')} | {stage_of(str(row.get('name', '')))} | {_fmt(row.get('weight_shape'))} | "
                         f"{_fmt(row.get('input_size'))} | {_fmt(_value(row.get('lower')))} | "
                         f"{_fmt(_value(row.get('upper')))} | {_fmt(_value(row.get('gap')))} | {_fmt(row.get('ratio_to_random'))} | "
                         f"{_fmt(row.get('upper_method', row.get('method')))} |")
        lines.append("")
    return lines


def _has_seeds(results: dict[str, Any]) -> bool:
    """Whether the results hold a multi-seed study (some configuration with two or more runs)."""
    study = results.get("study")
    return isinstance(study, dict) and any(c.get("n_runs", 0) >= 2 for c in study.get("configurations") or [])


def theory_lines(models: Sequence[ModelRecord | dict[str, Any]]) -> list[str]:
    """The theory's numbers beside the measurements, each labelled with the weights it describes; no orderings."""
    models = as_records(models)
    if not any(_finite(m.get(k)) for m in models for k in ("theory_prediction", "theory_measured_norms")):
        return []
    lines = ["## Theory vs measurement", "",
             "The theory's numbers describe different weights: the a-priori predictions are for random weights (iid "
             "std 0.05, or the model's Kaiming initialisation) and never see training; `theory_measured_norms` "
             "evaluates the same composition rule with the trained layers' certified norms and batch-norm gains "
             "(a certified upper bound of the trained model). The certified and data bounds are of the trained model.", "",
             "| model | theory a priori, iid std 0.05 (estimate) | theory at initialisation, Kaiming (estimate) | "
             "theory with trained layer norms (certified_upper) | certified upper (certified_upper) | "
             "data lower (lower) | robust acc [95% binomial CI] |", "|---|---|---|---|---|---|---|"]
    for m in models:
        lines.append(f"| {m.get('name', '')} | {_fmt(m.theory_prediction)} | {_fmt(m.theory_prediction_kaiming)} | "
                     f"{_fmt(m.theory_measured_norms)} | {_fmt(m.certified_lipschitz)} | "
                     f"{_fmt(m.empirical_lipschitz)} | {_accuracy_with_interval(m)} |")
    lines += ["", "One run (one seed) per model: differences between these models are not measured against "
                  "seed-to-seed variation, so no ordering here is a claim. For claims with seeds and intervals run a "
                  "study (`archlip sweep digits-study`).", ""]
    return lines


def _accuracy_with_interval(m: ModelRecord) -> str:
    from experiments.stats import accuracy_interval
    from experiments.study import eval_points

    acc, n = m.robust_acc, eval_points(m)
    if not _finite(acc):
        return "-"
    if not n:
        return _fmt(acc)
    ci = accuracy_interval(float(acc), n)
    return f"{acc:.4f} [{ci.low:.3f}, {ci.high:.3f}] (n={n})"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, regenerate: str | None = None) -> Path:
    """Render ``report.md`` and its PNG figures for ``run_dir``; returns the report's path.

    A training run folder (``metrics.jsonl``, no results) gets a history report; demos and sweeps also get the
    history figure of their runs.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    histories = find_histories(run_dir)
    if (run_dir / HISTORY_FILE).is_file() and not (run_dir / "results.json").is_file():
        return write_history_report(run_dir, histories, out_dir, regenerate or f"archlip report {run_dir}")
    results = load_results(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = results.get("models", [])
    is_study = _has_seeds(results)
    figures = make_figures(models, out_dir, sweep=results.get("kind") == "sweep", metrics=results.get("metrics"),
                           per_run_scatter=not is_study)
    history_figure = plot_history(histories, out_dir / "training_history.png") if histories else None
    if history_figure is not None:
        figures["training_history"] = history_figure
    if is_study:
        from experiments.study import write_configuration_csv
        from experiments.study_report import study_figures

        figures.update(study_figures(results["study"], models, out_dir))
        write_configuration_csv(results["study"], out_dir / "configs.csv")
    elif any(m.spectra for m in models):
        from experiments.study_report import plot_spectra

        path = plot_spectra(models, out_dir / "spectra.png")
        if path is not None:
            figures["spectra"] = path
    if results.get("kind") == "sweep" and models:
        write_csv(table_rows(models), out_dir / "table.csv")
    text = render_markdown(results, figures, out_dir, regenerate or f"archlip report {run_dir}")
    return write_text(out_dir / "report.md", text)


def write_history_report(run_dir: Path, histories: Mapping[str, Sequence[dict[str, Any]]], out_dir: Path,
                         regenerate: str) -> Path:
    """``report.md`` of one training run folder: its history figure and the last epoch's numbers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = next(iter(histories.values()), [])
    figure = plot_history(histories, out_dir / "training_history.png")
    curves = plot_training_curves(rows, out_dir / "training_curves.png")
    lines = [f"# archlip training report: {run_dir.name}", "",
             f"Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}. Regenerate with `{regenerate}`.", "",
             "## Training", ""]
    summary_file = run_file(run_dir, "train_summary")
    summary = _read_json(summary_file) if summary_file.is_file() else {}
    if summary:
        sel = summary.get("selection") or {}
        lines += [f"Status {summary.get('status')}: {summary.get('epochs_completed')} of {summary.get('epochs')} epochs, "
                  f"{summary.get('global_step')} steps; selection {sel.get('metric')} (best epoch {sel.get('best_epoch')}, "
                  f"value {_fmt(sel.get('best_value'))}).", ""]
        for key, text in (summary.get("history") or {}).items():
            lines.append(f"- {key}: {_fmt(text)}")
        lines.append("")
    keys = [k for k in ("epoch", "lr", "train_loss", "train_adv_acc", "val_clean_acc", "val_pgd_acc", "val_hist_pgd_acc",
                        "val_hist_stable_acc", "val_hist_local_lipschitz", "val_hist_yang_lipschitz")
            if any(r.get(k) is not None for r in rows)]
    if rows:
        lines += ["## Per-epoch history (validation split; epochs from 0)", "", "| " + " | ".join(keys) + " |",
                  "|" + "|".join("---" for _ in keys) + "|"]
        lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows] + [""]
    for key, path in (("training_curves", curves), ("training_history", figure)):
        if path is not None:
            lines += [f"![{key}]({path.name})", "", f"*{_CAPTIONS[key]}*", ""]
    return write_text(out_dir / "report.md", "\n".join(lines))
