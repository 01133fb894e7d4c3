"""A multi-seed study from a sweep's run records: per-configuration statistics, the paper's claims as tests,
the theory checked on trained weights, and the figures and markdown of the study's report.

``analyse(models)`` groups the run records (``experiments.sweep`` adds ``config_id``, ``seed`` and ``groups``)
by configuration and returns a JSON-ready dict:

- ``configurations``: per configuration, mean / std / 95% bootstrap interval of every metric over seeds, and the
  binomial interval of each run's robust accuracy on its test points (``experiments.stats``);
- ``claims``: the four claims of Huang et al. 2021 as tests --
  (1) ``params``: rank correlation of parameter count with robust accuracy over configurations;
  (2) ``last_stage``: paired-by-seed differences when the last stage's width or depth is reduced (every smaller
  setting against the largest one, all else equal);
  (3) ``budget``: in each group with a parameter budget, every configuration against the best one;
  (4) ``lipschitz``: rank correlations of robust accuracy with the certified and data Lipschitz values and the
  theory's predictions, over configurations;
- ``theory``: the composition rule with measured layer norms against the certified and data bounds, and a
  trained-weight model (``lipschitz.theory.trained``) fitted across configurations with its leave-one-out error;
- ``spectra``: per stage, how far trained spectra depart from the random-matrix law (initial weights beside them).

Differences whose interval contains 0 are "no detectable difference". References: Huang et al. 2021.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from experiments import stats
from experiments.records import ModelRecord, as_record, as_records

#: Metrics aggregated per configuration (record keys; ``robust_acc_per_attack`` entries are added per attack).
METRICS: tuple[str, ...] = (
    "clean_acc", "robust_acc", "certified_lipschitz", "certified_lipschitz_product", "empirical_lipschitz",
    "attack_lipschitz", "local_lipschitz", "stable_acc", "theory_prediction", "theory_prediction_kaiming",
    "theory_measured_norms",
)

#: Lipschitz-type quantities tested against robust accuracy for claim (4), with what each is.
LIPSCHITZ_KEYS: dict[str, str] = {
    "certified_lipschitz": "certified upper bound (trained)",
    "empirical_lipschitz": "data lower bound: max Jacobian norm (trained)",
    "local_lipschitz": "local Lipschitz metric (trained, estimate)",
    "theory_measured_norms": "theory rule with trained layer norms (certified upper)",
    "theory_prediction": "theory a priori: iid random weights (not trained)",
    "theory_prediction_kaiming": "theory a priori: Kaiming initialisation (not trained)",
}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def config_of(record: ModelRecord | dict[str, Any]) -> str:
    record = as_record(record)
    return str(record.config_id or record.name)


def seed_of(record: ModelRecord | dict[str, Any]) -> Any:
    record = as_record(record)
    return record.seed if record.seed is not None else (record.train or {}).get("seed", 0)


def metric_values(record: ModelRecord | dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of one run (``robust_acc[ATTACK]`` per attack, ``stage_bound[STAGE]`` per stage)."""
    record = as_record(record)
    out = {k: float(record.get(k)) for k in METRICS if _finite(record.get(k))}
    for attack, value in (record.robust_acc_per_attack or {}).items():
        if _finite(value):
            out[f"robust_acc[{attack}]"] = float(value)
    for stage, value in (record.stage_bounds or {}).items():
        value = value.get("value") if isinstance(value, dict) else value
        if _finite(value):
            out[f"stage_bound[{stage}]"] = float(value)
    return out


def eval_points(record: ModelRecord | dict[str, Any]) -> int | None:
    """Number of test points robust accuracy was measured on (from the eval description, e.g. "first 359 points")."""
    import re

    text = str(as_record(record).eval_points or "")
    match = re.search(r"(\d+)\s+points", text)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------
# per-configuration summaries
# ----------------------------------------------------------------------------------------------


def group_runs(models: Sequence[ModelRecord]) -> dict[str, list[ModelRecord]]:
    """Run records by configuration id, in first-seen order."""
    groups: dict[str, list[ModelRecord]] = {}
    for m in models:
        groups.setdefault(config_of(m), []).append(m)
    return groups


def summarize_configuration(config: str, runs: Sequence[ModelRecord]) -> dict[str, Any]:
    """Mean, std and 95% bootstrap interval of each metric over the runs (seeds) of one configuration."""
    first = runs[0]
    values: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        for key, value in metric_values(run).items():
            values[key].append(value)
    binomial = []
    for run in runs:
        n = eval_points(run)
        for attack, acc in {"worst": run.robust_acc, **(run.robust_acc_per_attack or {})}.items():
            if n and _finite(acc):
                ci = stats.accuracy_interval(float(acc), n)
                binomial.append({"seed": seed_of(run), "attack": attack, "acc": float(acc), "n_points": n,
                                 "ci_low": ci.low, "ci_high": ci.high})
    return {
        "config_id": config, "groups": list(first.groups or []), "depths": first.depths,
        "widths": first.widths, "params": first.params, "n_runs": len(runs),
        "seeds": [seed_of(r) for r in runs],
        "metrics": {k: stats.summarize(v).to_dict() for k, v in values.items()},
        "robust_binomial": binomial,
    }


def by_seed(runs: Sequence[ModelRecord], metric: str) -> dict[Any, float]:
    """``{seed: value}`` of one metric over a configuration's runs."""
    return {seed_of(r): v for r in runs if _finite(v := metric_values(r).get(metric))}


# ----------------------------------------------------------------------------------------------
# claims
# ----------------------------------------------------------------------------------------------


def claim_metrics(models: Sequence[ModelRecord]) -> list[str]:
    """Accuracy metrics every claim is tested on: worst-case robust, each attack's robust, clean."""
    attacks = sorted({a for m in models for a in (m.robust_acc_per_attack or {})})
    keys = ["robust_acc"] + [f"robust_acc[{a}]" for a in attacks if len(attacks) > 1] + ["clean_acc"]
    return keys


def _same_except_last(a: dict[str, Any], b: dict[str, Any], field: str, other: str) -> bool:
    fa, fb, oa, ob = a.get(field), b.get(field), a.get(other), b.get(other)
    if not (isinstance(fa, list) and isinstance(fb, list) and len(fa) == len(fb) and fa and oa == ob and oa):
        return False
    return fa[:-1] == fb[:-1] and fa[-1] != fb[-1]


def last_stage_pairs(configs: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
    """(larger, reduced, what) pairs that differ only in the last stage's width or depth; every smaller setting is
    paired with the largest one of its family."""
    pairs = []
    for field, other, label in (("widths", "depths", "width"), ("depths", "widths", "depth")):
        for c in configs:
            family = [d for d in configs if d is c or _same_except_last(c, d, field, other)]
            largest = max(family, key=lambda d: d[field][-1])
            if c is not largest and c[field][-1] < largest[field][-1]:
                fixed = f"{other} {'-'.join(map(str, c[other]))}"
                pairs.append((largest, c, f"last-stage {label} {largest[field][-1]} -> {c[field][-1]} ({fixed})"))
    return pairs


def compare(a: str, b: str, runs: dict[str, list[ModelRecord]], metrics: Sequence[str], change: str) -> dict[str, Any]:
    """Paired-by-seed differences b - a on each metric, with the sentence for the first metric."""
    diffs = {m: stats.paired_difference(by_seed(runs[a], m), by_seed(runs[b], m), a_name=a, b_name=b, metric=m)
             for m in metrics}
    primary = diffs[metrics[0]]
    return {"change": change, "from": a, "to": b, "differences": {m: d.to_dict() for m, d in diffs.items()},
            "sentence": stats.describe_difference(primary, change)}


def budget_claims(configs: Sequence[dict[str, Any]], runs: dict[str, list[ModelRecord]],
                  metrics: Sequence[str], budget_groups: Sequence[str]) -> dict[str, Any]:
    """In each budget group ("*": all configurations): every configuration against the one with the highest mean
    robust accuracy."""
    out = {}
    for group in budget_groups:
        members = [c for c in configs if group == "*" or group in c["groups"]]
        scored = [c for c in members if _finite((c["metrics"].get(metrics[0]) or {}).get("mean"))]
        if len(scored) < 2:
            continue
        best = max(scored, key=lambda c: c["metrics"][metrics[0]]["mean"])
        tests = [compare(best["config_id"], c["config_id"], runs, metrics,
                         f"{c['config_id']} instead of the best, {best['config_id']},")
                 for c in scored if c is not best]
        beaten = [t for t in tests if t["differences"][metrics[0]]["detectable"]]
        out[group] = {"best": best["config_id"], "tests": tests,
                      "summary": (f"{best['config_id']} has the highest mean {metrics[0]}; it is detectably better than "
                                  f"{len(beaten)} of the {len(tests)} other configurations of '{group}' "
                                  "(the best is chosen on the same data, so these differences are optimistic)")}
    return out


def correlation_claims(configs: Sequence[dict[str, Any]], metric: str = "robust_acc") -> dict[str, Any]:
    """Rank correlations over configurations (means over seeds) of ``metric`` with params and Lipschitz values."""
    def means(key: str) -> list[float | None]:
        if key == "params":
            return [c.get("params") for c in configs]
        return [(c["metrics"].get(key) or {}).get("mean") for c in configs]

    def corr(xs: list, ys: list, x_name: str, y_name: str) -> dict[str, Any]:
        c = stats.rank_correlation(xs, ys, x_name=x_name, y_name=y_name)
        return {**c.to_dict(), "sentence": stats.describe_correlation(c)}

    y = means(metric)
    out = {"params": corr(means("params"), y, "parameters", metric)}
    for key, label in LIPSCHITZ_KEYS.items():
        if any(_finite(v) for v in means(key)):
            out[key] = corr(means(key), y, label, metric)
    out["theory_prediction~certified_lipschitz"] = corr(means("theory_prediction"), means("certified_lipschitz"),
                                                        "theory a priori", "certified upper bound")
    out["theory_measured_norms~certified_lipschitz"] = corr(means("theory_measured_norms"), means("certified_lipschitz"),
                                                            "theory with trained norms", "certified upper bound")
    return out


# ----------------------------------------------------------------------------------------------
# theory on trained weights, spectra
# ----------------------------------------------------------------------------------------------


def _geo_mean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if _finite(v) and v > 0]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None


def theory_on_trained(runs: dict[str, list[ModelRecord]]) -> dict[str, Any]:
    """Composition rule with trained norms vs certified/data bounds; fitted trained-weight model, leave-one-out."""
    from lipschitz.theory.trained import LayerFact, fit_trained_model, leave_one_out

    facts, measured, structure, stages, ratios = {}, {}, {}, {}, []
    for config, members in runs.items():
        with_facts = [r for r in members if r.theory_facts and r.theory_structure]
        if not with_facts:
            continue
        facts[config] = [LayerFact(**f) for r in with_facts for f in r.theory_facts]
        measured[config] = _geo_mean([r.theory_measured_norms for r in with_facts])
        structure[config] = with_facts[0].theory_structure
        factors = [r.theory_measured_stage_factors or [] for r in with_facts]
        stages[config] = [_geo_mean([f[i] for f in factors if len(f) > i]) for i in range(len(factors[0]))]
        for r in with_facts:
            row = {"config_id": config, "seed": seed_of(r), "theory_measured_norms": r.theory_measured_norms}
            for key in ("certified_lipschitz", "certified_lipschitz_product", "empirical_lipschitz", "theory_prediction"):
                if _finite(r.get(key)) and _finite(r.theory_measured_norms) and r.get(key) > 0:
                    row[f"over_{key}"] = r.theory_measured_norms / r.get(key)
            ratios.append(row)
    if not facts:
        return {}
    model = fit_trained_model([f for fs in facts.values() for f in fs])
    held = leave_one_out(facts, {c: v for c, v in measured.items() if v}, structure, stages)
    return {"per_run": ratios, "laws": model.to_rows(),
            "held_out": [h.__dict__ for h in held],
            "held_out_abs_log_error": _geo_mean([math.exp(abs(math.log1p(h.rel_error))) for h in held]),
            "structure": structure}


def spectra_by_stage(models: Sequence[ModelRecord]) -> list[dict[str, Any]]:
    """Per stage and weights (init/trained): median top/edge, mean outliers (and the random draw's), median alpha."""
    import statistics

    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for m in models:
        for label, rows in ((m.spectra or {}).items()):
            for row in rows:
                cells[(row.get("stage", "other"), label)].append(row)
    out = []
    for (stage, label), rows in sorted(cells.items()):
        def med(key: str) -> float | None:
            vals = [r[key] for r in rows if _finite(r.get(key))]
            return statistics.median(vals) if vals else None

        ratios = [r["top"] / r["bulk_edge"] for r in rows if _finite(r.get("top")) and _finite(r.get("bulk_edge")) and r["bulk_edge"] > 0]
        out.append({"stage": stage, "weights": label, "layers": len(rows),
                    "top_over_edge_median": statistics.median(ratios) if ratios else None,
                    "outliers_mean": sum(r.get("n_outliers") or 0 for r in rows) / len(rows),
                    "random_outliers_mean": sum(r.get("random_n_outliers") or 0 for r in rows) / len(rows),
                    "alpha_median": med("alpha"), "random_alpha_median": med("random_alpha")})
    return out


# ----------------------------------------------------------------------------------------------
# the whole analysis
# ----------------------------------------------------------------------------------------------


def analyse(models: Sequence[ModelRecord | dict[str, Any]], budget_groups: Sequence[str] = ()) -> dict[str, Any]:
    """Everything above for a list of run records (``ModelRecord`` or their dicts); JSON-ready. ``budget_groups``:
    group names with a budget."""
    models = as_records(models)
    runs = group_runs(models)
    configs = [summarize_configuration(c, rs) for c, rs in runs.items()]
    metrics = claim_metrics(models)
    last = [compare(a["config_id"], b["config_id"], runs, metrics, change)
            for a, b, change in last_stage_pairs(configs)]
    seeds = sorted({seed_of(m) for m in models}, key=str)
    return {
        "seeds": seeds, "n_runs": len(models), "n_configurations": len(configs), "metrics": metrics,
        "configurations": configs,
        "claims": {"last_stage": last, "budget": budget_claims(configs, runs, metrics, budget_groups),
                   "correlations": correlation_claims(configs)},
        "theory": theory_on_trained(runs),
        "spectra": spectra_by_stage(models),
    }


def configuration_rows(study: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of ``configs.csv``: one per configuration with mean, std and interval of each metric."""
    rows = []
    for c in study.get("configurations", []):
        row: dict[str, Any] = {"config_id": c["config_id"], "groups": "+".join(c["groups"]), "depths": c["depths"],
                               "widths": c["widths"], "params": c["params"], "n_runs": c["n_runs"]}
        for key, s in sorted(c["metrics"].items()):
            row.update({f"{key} mean": s["mean"], f"{key} std": s["std"],
                        f"{key} ci_low": s["ci_low"], f"{key} ci_high": s["ci_high"]})
        rows.append(row)
    return rows


def write_configuration_csv(study: dict[str, Any], path: str | Path) -> Path | None:
    from experiments.render import write_csv

    rows = configuration_rows(study)
    if not rows:
        return None
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return write_csv([{k: r.get(k) for k in columns} for r in rows], path)
