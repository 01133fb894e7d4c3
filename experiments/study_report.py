"""Figures (with error bars) and markdown sections of a multi-seed study (``experiments.study.analyse``).

``study_figures(study, models, out_dir)`` writes the PNGs; ``study_markdown(study, figures, report_dir, regenerate)``
returns the report lines that state every claim as a test with its effect size and interval.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from experiments.records import ModelRecord, as_records
from experiments.render import fmt as _fmt
from experiments.render import pyplot as _pyplot
from experiments.render import save_figure as _save

POINTS = 100.0  # accuracies are shown in points (percent)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _stat(config: dict[str, Any], key: str) -> dict[str, Any]:
    return config["metrics"].get(key) or {}


def _err(s: dict[str, Any], scale: float = 1.0) -> tuple[float, float, float] | None:
    """(mean, lower error, upper error) of a summary for matplotlib's yerr/xerr (zero when no interval)."""
    if not _finite(s.get("mean")):
        return None
    m = s["mean"] * scale
    lo = s["ci_low"] * scale if _finite(s.get("ci_low")) else m
    hi = s["ci_high"] * scale if _finite(s.get("ci_high")) else m
    return m, max(0.0, m - lo), max(0.0, hi - m)


def _families(configs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Configurations that differ only in the last stage's width, keyed by a label of what they share."""
    fams: dict[str, list[dict[str, Any]]] = {}
    for c in configs:
        if not c.get("widths") or not c.get("depths"):
            continue
        key = f"depths {'-'.join(map(str, c['depths']))}, widths {'-'.join(map(str, c['widths'][:-1]))}-*"
        fams.setdefault(key, []).append(c)
    return {k: sorted(v, key=lambda c: c["widths"][-1]) for k, v in fams.items() if len(v) > 1}


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------


def plot_last_stage(study: dict[str, Any], path: str | Path) -> Path | None:
    """Mean accuracy with 95% bootstrap intervals against the last-stage width, one line per depth setting."""
    fams = _families(study.get("configurations", []))
    if not fams:
        return None
    plt = _pyplot()
    keys = [k for k in study.get("metrics", []) if k != "clean_acc"] + ["clean_acc"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.3 * len(keys), 3.9), squeeze=False, sharex=True)
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    for ax, key in zip(axes[0], keys):
        for j, (label, members) in enumerate(fams.items()):
            pts = [(c["widths"][-1], e) for c in members if (e := _err(_stat(c, key), POINTS))]
            if not pts:
                continue
            xs = [x * (1 + 0.03 * (j - (len(fams) - 1) / 2)) for x, _ in pts]
            ax.errorbar(xs, [e[0] for _, e in pts], yerr=[[e[1] for _, e in pts], [e[2] for _, e in pts]], marker="o",
                        capsize=3, color=colours[j % len(colours)], label=label)
        ax.set_xscale("log", base=2)
        widths = sorted({c["widths"][-1] for fam in fams.values() for c in fam})
        ax.set_xticks(widths)
        ax.set_xticklabels([str(w) for w in widths])
        ax.set_xlabel("last-stage width")
        ax.set_title(key.replace("robust_acc", "robust acc").replace("clean_acc", "clean acc"), fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"last stage: mean over {len(study.get('seeds', []))} seeds with the 95% bootstrap interval of the mean",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_differences(study: dict[str, Any], path: str | Path) -> Path | None:
    """Forest plot: paired-by-seed differences (points of robust accuracy) with their 95% bootstrap intervals."""
    claims = study.get("claims", {})
    primary = (study.get("metrics") or ["robust_acc"])[0]
    tests = [(t["change"], t) for t in claims.get("last_stage", [])]
    tests += [(f"{group}: {t['to']} vs best {t['from']}", t) for group, g in (claims.get("budget") or {}).items()
              for t in g["tests"]]
    rows = [(label, t["differences"][primary]) for label, t in tests if t["differences"].get(primary, {}).get("n")]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 0.42 * len(rows) + 1.6))
    for i, (label, d) in enumerate(rows):
        ci = d.get("interval") or {}
        lo, hi = ci.get("low", d["mean"]), ci.get("high", d["mean"])
        colour = "#d62728" if d["detectable"] else "#555555"
        ax.errorbar([d["mean"] * POINTS], [i], xerr=[[(d["mean"] - lo) * POINTS], [(hi - d["mean"]) * POINTS]],
                    fmt="o", color=colour, capsize=3)
    ax.axvline(0, color="k", lw=1)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"change in {primary} (points), paired by seed, 95% bootstrap interval\n"
                  "red: the bootstrap and t intervals exclude 0; grey: no detectable difference", fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_lipschitz(study: dict[str, Any], path: str | Path) -> Path | None:
    """Robust accuracy against each Lipschitz quantity over configurations, both with 95% intervals (log x)."""
    from experiments.study import LIPSCHITZ_KEYS

    configs = study.get("configurations", [])
    keys = [k for k in LIPSCHITZ_KEYS if sum(_err(_stat(c, k)) is not None for c in configs) >= 2]
    if not keys:
        return None
    plt = _pyplot()
    cols = min(3, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.4 * cols, 3.6 * rows_n), squeeze=False, sharey=True)
    from matplotlib.ticker import NullFormatter

    corr = study.get("claims", {}).get("correlations", {})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(configs) > len(colours):
        colours = [plt.get_cmap("tab20")(i % 20) for i in range(len(configs))]
    for ax, key in zip(axes.flat, keys):
        xs = []
        for i, c in enumerate(configs):
            x, y = _err(_stat(c, key)), _err(_stat(c, "robust_acc"), POINTS)
            if x and y and x[0] > 0:
                xs.append(x[0])
                ax.errorbar([x[0]], [y[0]], xerr=[[x[1]], [x[2]]], yerr=[[y[1]], [y[2]]], fmt="o", ms=4, capsize=2,
                            color=colours[i % len(colours)], label=c["config_id"])
        if xs and max(xs) / min(xs) > 3:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        c = corr.get(key) or {}
        rho = f"rho {c['rho']:+.2f}" + (f" [{c['interval']['low']:+.2f}, {c['interval']['high']:+.2f}]"
                                         if c.get("interval") else "") if c.get("rho") is not None else "no rho"
        ax.set_title(f"{LIPSCHITZ_KEYS[key]}\n{rho}", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel("robust accuracy (%)")
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * math.ceil(len(labels) / 4), 1, 1))
    return _save(fig, plt, path)


def plot_theory(study: dict[str, Any], path: str | Path) -> Path | None:
    """Left: per run, the theory rule with trained norms over the certified and data bounds. Right: held-out
    predictions of the fitted trained-weight model against the measured composition."""
    theory = study.get("theory") or {}
    per_run, held = theory.get("per_run") or [], theory.get("held_out") or []
    if not per_run:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2))
    ax = axes[0]
    labels = [("over_certified_lipschitz", "/ certified (best composition)"), ("over_certified_lipschitz_product", "/ certified (plain product)"),
              ("over_empirical_lipschitz", "/ data lower bound"), ("over_theory_prediction", "/ a-priori theory (iid weights)")]
    for j, (key, label) in enumerate(labels):
        vals = [r[key] for r in per_run if _finite(r.get(key))]
        if vals:
            ax.scatter([j] * len(vals), vals, s=12, alpha=0.6)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([lab for _, lab in labels], rotation=15, fontsize=7)
    ax.set_yscale("log")
    ax.axhline(1, color="k", lw=1)
    ax.set_ylabel("theory with trained norms / ...")
    ax.set_title("the composition rule on trained weights (one point per run)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax = axes[1]
    if held:
        meas, pred = [h["measured"] for h in held], [h["predicted"] for h in held]
        ax.scatter(meas, pred)
        for h in held:
            ax.annotate(h["config"], (h["measured"], h["predicted"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        from matplotlib.ticker import NullFormatter

        lo, hi = min(meas + pred) * 0.7, max(meas + pred) * 1.4
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("measured: rule with trained norms (geometric mean over seeds)")
    ax.set_ylabel("predicted from the other configurations")
    ax.set_title("fitted trained-weight model, leave one configuration out", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_spectra(models: Sequence[ModelRecord | dict[str, Any]], path: str | Path) -> Path | None:
    """Per stage: singular values / bulk edge against rank for every layer of one run, trained vs initial weights."""
    from experiments.render import STAGE_COLOURS as _STAGE_COLOURS

    run = next((m for m in as_records(models) if (m.spectra or {}).get("trained")), None)
    if run is None:
        return None
    spectra = run.spectra
    stages = list(dict.fromkeys(r["stage"] for r in spectra["trained"]))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(stages), figsize=(3.3 * len(stages), 3.6), squeeze=False, sharey=True)
    for ax, stage in zip(axes[0], stages):
        for label, style in (("init", dict(color="#999999", ls="--", lw=1)), ("trained", dict(color=_STAGE_COLOURS.get(stage, "#1f77b4"), lw=1.4))):
            for row in (r for r in spectra.get(label, []) if r["stage"] == stage):
                prof = row.get("profile") or []
                if prof:
                    ax.plot([p[0] for p in prof], [p[1] for p in prof], **style)
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("rank / number of singular values")
        ax.grid(True, which="both", alpha=0.3)
    top = max((p[1] for rows in spectra.values() for r in rows for p in r.get("profile") or []), default=1.0)
    axes[0][0].set_ylim(0.05, max(1.5, top * 1.3))  # rank-deficient operators (strided 1x1 shortcuts) have exact zeros
    axes[0][0].set_ylabel("singular value / random-matrix bulk edge")
    fig.suptitle(f"spectra of {run.name}: trained (solid) vs initial weights (dashed); 1 = bulk edge of iid "
                 "weights with the same entry std", fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, path)


def study_figures(study: dict[str, Any], models: Sequence[ModelRecord], out_dir: str | Path) -> dict[str, Path]:
    """Every study figure the data supports; ``{key: path}``."""
    out_dir = Path(out_dir)
    figures = {
        "study_last_stage": plot_last_stage(study, out_dir / "study_last_stage.png"),
        "study_differences": plot_differences(study, out_dir / "study_differences.png"),
        "study_lipschitz": plot_lipschitz(study, out_dir / "study_lipschitz.png"),
        "study_theory": plot_theory(study, out_dir / "study_theory.png"),
        "study_spectra": plot_spectra(models, out_dir / "study_spectra.png"),
    }
    return {k: v for k, v in figures.items() if v is not None}


CAPTIONS = {
    "study_last_stage": "Accuracy against the last-stage width (mean over seeds, 95% bootstrap interval of the mean), one line per depth setting.",
    "study_differences": "Paired-by-seed differences in robust accuracy for every tested change (last stage reduced; budget configurations against the best one), with 95% bootstrap intervals. Red: the interval (and the t interval) excludes 0.",
    "study_lipschitz": "Robust accuracy against each Lipschitz quantity, one point per configuration (means over seeds, 95% intervals on both axes); the titles give Spearman's rho over configurations with its bootstrap interval.",
    "study_theory": "Left: the theory's composition rule evaluated with the trained layers' certified norms, divided by the certified bound (best composition and plain product), the data lower bound and the a-priori prediction; one point per run. Right: the fitted trained-weight model's prediction for each configuration it was not fitted on.",
    "study_spectra": "Full singular-value spectra of every layer of one run (exact: FFT or dense SVD; top-k by Lanczos for large layers), scaled by the random-matrix bulk edge of iid weights with the same entry std: trained weights (solid) against the initial weights of the same run (dashed).",
}


# ----------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------


def _ms(s: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    """"mean ± std [lo, hi]" of a summary."""
    if not s or not _finite(s.get("mean")):
        return "-"
    if scale != 1.0:
        text = f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"
        if _finite(s.get("ci_low")):
            text += f" [{s['ci_low'] * scale:.{digits}f}, {s['ci_high'] * scale:.{digits}f}]"
        return text
    text = f"{_fmt(s['mean'])} ± {_fmt(s['std'])}"
    return text + (f" [{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}]" if _finite(s.get("ci_low")) else "")


def _diff_cell(d: dict[str, Any]) -> str:
    if not d or not d.get("n"):
        return "-"
    ci = d.get("interval")
    text = f"{d['mean'] * POINTS:+.1f}" + (f" [{ci['low'] * POINTS:+.1f}, {ci['high'] * POINTS:+.1f}]" if ci else "")
    return f"**{text}**" if d.get("detectable") else f"{text} n.d."


def design_lines(study: dict[str, Any], models: Sequence[ModelRecord]) -> list[str]:
    from experiments.study import eval_points

    points = sorted({eval_points(m) for m in models if eval_points(m)})
    attacks = sorted({a for m in models for a in (m.robust_acc_per_attack or {})})
    return ["## Study design", "",
            f"{study['n_configurations']} configurations x seeds {study['seeds']} = {study['n_runs']} runs. "
            f"Robust accuracy: {', '.join(attacks) or '?'} on {', '.join(map(str, points)) or '?'} test points; "
            "`robust_acc` is the worst case over those attacks per point. Every number below is a mean over seeds "
            "± its standard deviation [95% bootstrap interval of the mean]; differences are paired by seed (same "
            "data order and attack seeds) and written **bold** only when both the bootstrap and the Student-t "
            "interval exclude 0 (n.d.: no detectable difference).", ""]


def configuration_lines(study: dict[str, Any]) -> list[str]:
    keys = [k for k in study["metrics"] if k != "clean_acc"]
    extra = [("certified_lipschitz", "certified L (upper)"), ("empirical_lipschitz", "data L (lower)"),
             ("local_lipschitz", "local Lipschitz (estimate)"), ("theory_measured_norms", "theory, trained norms (upper)"),
             ("theory_prediction", "theory a priori (estimate)")]
    header = ["configuration", "groups", "params", "clean acc (%)"] + [f"{k} (%)" for k in keys] + [lab for _, lab in extra]
    lines = ["## Per-configuration results", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in study["configurations"]:
        cells = [c["config_id"], "+".join(c["groups"]) or "-", _fmt(c["params"]), _ms(_stat(c, "clean_acc"), POINTS)]
        cells += [_ms(_stat(c, k), POINTS) for k in keys] + [_ms(_stat(c, k)) for k, _ in extra]
        lines.append("| " + " | ".join(cells) + " |")
    binom = [b for c in study["configurations"] for b in c["robust_binomial"] if b["attack"] == "worst"]
    if binom:
        widths = [(b["ci_high"] - b["ci_low"]) * POINTS for b in binom]
        lines += ["", f"Test-set sampling error of a single run: the 95% binomial (Clopper-Pearson) interval of one run's "
                      f"robust accuracy on {binom[0]['n_points']} points is {min(widths):.1f}-{max(widths):.1f} points wide "
                      "(per run in results.json, `robust_binomial`)."]
    return lines + [""]


def claim_lines(study: dict[str, Any]) -> list[str]:
    claims, metrics = study["claims"], study["metrics"]
    corr = claims.get("correlations", {})
    lines = ["## The paper's claims as tests", "",
             "### (1) More parameters do not necessarily buy robustness", "", f"- {corr.get('params', {}).get('sentence', '-')}", ""]
    lines += ["### (2) Reducing the last stage's capacity improves robustness", ""]
    if claims.get("last_stage"):
        lines += ["| change | " + " | ".join(f"{m} (points)" for m in metrics) + " |", "|---|" + "---|" * len(metrics)]
        lines += [f"| {t['change']} | " + " | ".join(_diff_cell(t["differences"].get(m)) for m in metrics) + " |"
                  for t in claims["last_stage"]]
        lines += [""] + [f"- {t['sentence']}." for t in claims["last_stage"]]
    else:
        lines.append("- no pair of configurations differs only in the last stage.")
    lines += ["", "### (3) Under a fixed parameter budget an optimal configuration exists", ""]
    for group, g in (claims.get("budget") or {}).items():
        lines += [f"- {g['summary']}.", "", f"| '{group}': instead of {g['best']} | " + " | ".join(f"{m} (points)" for m in metrics) + " |",
                  "|---|" + "---|" * len(metrics)]
        lines += [f"| {t['to']} | " + " | ".join(_diff_cell(t["differences"].get(m)) for m in metrics) + " |" for t in g["tests"]]
        lines.append("")
    if not claims.get("budget"):
        lines += ["- no budget group in this sweep.", ""]
    lines += ["### (4) A Lipschitz analysis explains it", "",
              "Spearman's rho over configurations (means over seeds) with a 95% bootstrap interval over configurations; "
              "a lower Lipschitz value going with higher robustness shows as a negative rho.", ""]
    lines += [f"- {c['sentence']}" for key, c in corr.items() if key != "params"]
    return lines + [""]


def theory_lines(study: dict[str, Any]) -> list[str]:
    import statistics

    theory = study.get("theory") or {}
    if not theory.get("per_run"):
        return []
    lines = ["## The theory on trained weights", "",
             "`theory_prediction` is a-priori (iid random weights, std 0.05; `theory_prediction_kaiming`: the Kaiming "
             "initialisation): it never sees the trained weights. `theory_measured_norms` evaluates the same composition "
             "rule with each trained layer's certified norm and each batch norm's exact gain: a certified upper bound of "
             "the trained network, so its ratio to the certified and data bounds tests the rule itself.", ""]
    for key, label in (("over_certified_lipschitz", "certified bound (best composition)"),
                       ("over_certified_lipschitz_product", "certified bound (plain layer product)"),
                       ("over_empirical_lipschitz", "data lower bound (max Jacobian norm)"),
                       ("over_theory_prediction", "a-priori prediction (iid weights)")):
        vals = [r[key] for r in theory["per_run"] if _finite(r.get(key))]
        if vals:
            lines.append(f"- theory with trained norms / {label}: median {_fmt(statistics.median(vals))} "
                         f"(range {_fmt(min(vals))}-{_fmt(max(vals))}, {len(vals)} runs)")
    lines += ["", "Trained-weight model, fitted across all configurations: per stage and layer kind, "
                  "log value = a + b log(width) + c depth (value: certified layer norm or BN gain) and the same for the entry std "
                  "(Kaiming initialisation has std exponent -0.5; the fixed-variance model 0).", "",
              "| stage | kind | n | norm: width exponent | norm: depth slope | residual sd (log) | std: width exponent | std: depth slope |",
              "|---|---|---|---|---|---|---|---|"]
    def coef(v: Any) -> str:  # a feature that never varies gets slope 0 up to round-off
        return "0 (not varied)" if _finite(v) and abs(v) < 1e-9 else _fmt(v)

    for r in theory.get("laws", []):
        lines.append(f"| {r['stage']} | {r['kind']} | {r['n']} | {coef(r['value_width_exponent'])} | {coef(r['value_depth_slope'])} | "
                     f"{_fmt(r['value_residual_std'])} | {coef(r['std_width_exponent'])} | {coef(r['std_depth_slope'])} |")
    held = theory.get("held_out") or []
    if held:
        lines += ["", "Leave one configuration out: the model fitted on the other configurations predicts the held-out "
                      "configuration's composed bound (error relative to the rule with its measured norms).", "",
                  "| held-out configuration | predicted | measured | error |", "|---|---|---|---|"]
        lines += [f"| {h['config']} | {_fmt(h['predicted'])} | {_fmt(h['measured'])} | {h['rel_error'] * 100:+.0f}% |" for h in held]
        if _finite(theory.get("held_out_abs_log_error")):
            lines += ["", f"Typical held-out error: a factor {theory['held_out_abs_log_error']:.3g} (geometric mean of "
                          "max(predicted/measured, measured/predicted)). Layer kinds are pooled per stage (conv1 with conv2, "
                          "bn1 with bn2), so the residual spread of a law includes the differences between those roles."]
    return lines + [""]


def spectra_lines(study: dict[str, Any]) -> list[str]:
    rows = study.get("spectra") or []
    if not rows:
        return []
    lines = ["## Spectra against the random-matrix law", "",
             "Per stage, over every layer of every run: top singular value over the bulk edge of iid weights with the "
             "same entry std (median), singular values above the outlier threshold max(bulk edge, top of a Gaussian "
             "draw through the same operator) (mean per layer; the Gaussian draw's own count beside it), and the "
             "power-law exponent alpha of the eigenvalues s^2 (median; the Gaussian draw's beside it).", "",
             "| stage | weights | layers | top / edge | outliers per layer (random) | alpha (random) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['weights']} | {r['layers']} | {_fmt(r['top_over_edge_median'])} | "
                     f"{r['outliers_mean']:.2f} ({r['random_outliers_mean']:.2f}) | {_fmt(r['alpha_median'])} ({_fmt(r['random_alpha_median'])}) |")
    return lines + [""]


def limits_lines(study: dict[str, Any]) -> list[str]:
    n_seeds = len(study.get("seeds", []))
    n_tests = len(study["claims"].get("last_stage", [])) + sum(len(g["tests"]) for g in (study["claims"].get("budget") or {}).values())
    return ["## What this run can and cannot show", "",
            f"- {n_seeds} seeds per configuration: a bootstrap interval resamples only {n_seeds} values, so a difference "
            "counts as detectable only when the Student-t interval agrees; effects smaller than the seed-to-seed "
            "spread are not resolved.",
            f"- {n_tests} paired comparisons at 95% each: about {0.05 * n_tests:.1f} could exclude 0 by chance alone "
            "(no multiplicity correction is applied).",
            f"- Rank correlations over {study['n_configurations']} configurations: their intervals are wide, and a "
            "correlation is not a mechanism.",
            "- Everything is specific to this dataset, recipe, attack set and scale; it tests the claims here, it does "
            "not reproduce or refute the paper's CIFAR-10 results.", ""]


def study_markdown(study: dict[str, Any], models: Sequence[ModelRecord], figures: dict[str, Path],
                   report_dir: Path, regenerate: str) -> list[str]:
    """Every study section, figures with captions and the limits of the run."""
    lines = design_lines(study, models) + configuration_lines(study) + claim_lines(study)
    lines += theory_lines(study) + spectra_lines(study) + limits_lines(study)
    if figures:
        lines += ["## Study figures", ""]
        for key, path in figures.items():
            lines += [f"![{key}]({Path(path).name})", "", f"*{CAPTIONS.get(key, key)}* Regenerate: `{regenerate}`.", ""]
    return lines
