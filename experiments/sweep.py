"""Sweeps over per-stage depth and width: grid expansion, fixed-parameter-budget configurations,
resumable execution (sequential or one ``torchrun`` job per run) and aggregation.

A sweep file (YAML; shipped ones in ``experiments/configs/sweeps/``, loadable by name)::

    name: digits-cpu
    description: ...
    recipe: digits-pgdat-tiny          # a training recipe (name or path), see experiments/config.py
    set:                               # recipe overrides applied to every run
      run.epochs: 4
    grid:                              # cartesian product of recipe overrides, one run per combination
      model.overrides.depths: [[1, 1, 1], [1, 1, 2]]
      model.overrides.widths: [[8, 16, 32, 64], [8, 16, 32, 32]]
    configs:                           # extra runs, each a mapping of overrides (optional ``id``)
      - {id: wrn-34-10, model.overrides.depths: [5, 5, 5], model.overrides.widths: [16, 160, 320, 640]}
    budget:                            # optional: fixed parameter budget
      params: 46.2M
      tolerance: 0.05                  # keep runs within +-5% of the budget ...
      fit: stage_widths                # ... after rescaling the stage widths (not the stem) to meet it
      multiple_of: 8                   # widths rounded to multiples of 8 when fitting
    seeds: [0, 1, 2, 3, 4]             # optional: every configuration once per seed (run.seed), paired by seed
    groups:                            # optional, instead of grid/configs/budget: named sets of configurations,
      - {name: last-stage, grid: {...}}                  # each with its own grid/configs/budget/set
      - {name: budget, grid: {...}, budget: {params: 60k, fit: stage_widths}}
    evaluate: {attacks: [pgd20], eps: 8/255, n: 1000, checkpoint: best}   # best: the model selected on the
                                       # validation split (what the paper reports); final: the last weights
    analysis: {spectral: true, bound: true, lower_points: 128, theory: true, spectra: true}
    launcher: sequential               # or torchrun (one job per run) or submitit (one cluster job per run)
    workers: 1                         # sequential launcher: parallel worker processes on this machine
    nproc_per_node: 1
    torchrun_args: []                  # e.g. [--nnodes, "2", --rdzv-backend, c10d, --rdzv-endpoint, "host:29500"]
    cluster: auto                      # submitit: auto, slurm, local or debug
    slurm_partition: gpu               # submitit: any slurm_* key goes to submitit.AutoExecutor.update_parameters

Layout of a sweep directory: ``runs/<run_id>/{config.yaml, train/, record.json}``, then ``results.json``,
``table.csv``, ``configs.csv`` (per-configuration means and intervals, with seeds), ``report.md`` and the PNG
plots. With ``seeds`` a run id is ``<config id>_s<seed>``. A run is finished when its ``record.json`` exists; rerunning
the sweep skips finished runs and resumes interrupted training from its checkpoint. Sweeps written before the run files
were named by what they hold (``summary.json`` for the record and the training summary) are still read.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

from experiments.io import RunFolderLock, write_text
from experiments.launch import record_path
from experiments.records import ModelRecord

SWEEP_DIR = Path(__file__).resolve().parent / "configs" / "sweeps"
LAUNCHERS = ("sequential", "torchrun", "submitit")
SPEC_KEYS = ("name", "description", "recipe", "set", "grid", "configs", "budget", "evaluate", "analysis",
             "launcher", "nproc_per_node", "torchrun_args", "seeds", "groups", "workers", "cluster", "wait")
GROUP_KEYS = ("name", "set", "grid", "configs", "budget")
SEED_KEY = "run.seed"
BUDGET_KEYS = ("params", "tolerance", "fit", "multiple_of")
BUDGET_FITS = ("none", "stage_widths", "last_width")
CHECKPOINTS = ("best", "final")
DEPTHS_KEY = "model.overrides.depths"
WIDTHS_KEY = "model.overrides.widths"


@dataclass(frozen=True)
class RunSpec:
    """One configuration of a sweep: an id and the recipe overrides that define it."""

    run_id: str
    overrides: dict[str, Any]
    params: int | None = None
    config_id: str = ""
    seed: int | None = None
    groups: tuple[str, ...] = ()

    @property
    def config(self) -> str:
        """The configuration this run belongs to (its id without the seed suffix)."""
        return self.config_id or self.run_id


@dataclass
class SweepSpec:
    name: str
    recipe: str
    runs: list[RunSpec]
    base: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    analysis: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] | None = None
    launcher: str = "sequential"
    nproc_per_node: int = 1
    torchrun_args: list[str] = field(default_factory=list)
    description: str = ""
    source: str | None = None
    seeds: list[int] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    workers: int = 1
    cluster: str = "auto"
    slurm: dict[str, Any] = field(default_factory=dict)
    wait: bool = True
    budget_groups: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# spec: loading, grid expansion, budget
# ----------------------------------------------------------------------------------------------


def list_sweeps() -> list[str]:
    """Names of the sweep files shipped in experiments/configs/sweeps."""
    return sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))


def resolve_sweep_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SWEEP_DIR / f"{path.stem}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise FileNotFoundError(f"sweep file {str(name_or_path)!r} not found; give a path or a shipped sweep: {', '.join(list_sweeps())}")


def expand_grid(grid: Mapping[str, Sequence[Any]] | None) -> list[dict[str, Any]]:
    """Cartesian product of ``{key: [values]}`` in key order; an empty grid gives one empty point."""
    if not grid:
        return [{}]
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"grid key {key!r} needs a non-empty list of values, got {values!r}")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def run_id_for(overrides: Mapping[str, Any]) -> str:
    """A readable, filesystem-safe id: ``d1-1-2_w8-16-32-32`` for depths/widths, hashed tail for the rest."""
    if "id" in overrides:
        return str(overrides["id"])
    parts = []
    short = {DEPTHS_KEY: "d", WIDTHS_KEY: "w"}
    rest = {}
    for key, value in overrides.items():
        if key in short:
            parts.append(short[key] + "-".join(str(v) for v in (value if isinstance(value, (list, tuple)) else [value])))
        else:
            rest[key] = value
    for key, value in rest.items():
        leaf = key.split(".")[-1]
        text = "-".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        if len(text) <= 12 and all(c.isalnum() or c in "-._" for c in text):
            parts.append(f"{leaf}{text}")
        else:
            parts.append(leaf + hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:6])
    return "_".join(parts) or "base"


def load_sweep(name_or_path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; expands the grid and applies the parameter budget."""
    path = resolve_sweep_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc.__class__.__name__}); check the indentation") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a sweep file must be a mapping with keys {', '.join(SPEC_KEYS)}")
    spec = sweep_from_dict(raw, default_name=path.stem)
    spec.source = str(path)
    return spec


def sweep_from_dict(raw: Mapping[str, Any], default_name: str = "sweep",
                    count_params: Callable[[str, Mapping[str, Any]], int] | None = None) -> SweepSpec:
    """Validate a sweep mapping and expand it into runs (see the module docstring for the keys)."""
    from experiments.launch import CLUSTERS, slurm_parameters

    unknown = sorted(k for k in set(raw) - set(SPEC_KEYS) if not str(k).startswith("slurm_"))
    if unknown:
        raise ValueError(f"unknown sweep key(s) {unknown}; valid keys: {', '.join(SPEC_KEYS)} and slurm_* (submitit)")
    if "recipe" not in raw:
        raise ValueError("a sweep needs 'recipe': a training recipe name or path (see experiments/configs/)")
    launcher = raw.get("launcher", "sequential")
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}")
    base = dict(raw.get("set") or {})
    counter = count_params or count_params_for
    if raw.get("groups"):
        clash = [k for k in ("grid", "configs", "budget") if raw.get(k)]
        if clash:
            raise ValueError(f"a sweep with 'groups' takes {clash} inside each group, not at the top level")
        groups = raw["groups"]
        if not isinstance(groups, list) or not all(isinstance(g, Mapping) for g in groups):
            raise ValueError("'groups' must be a list of mappings with keys " + ", ".join(GROUP_KEYS))
        runs = _merge_groups([_expand_group(g, str(raw["recipe"]), base, counter, i) for i, g in enumerate(groups)])
    else:
        runs = _expand_group(raw, str(raw["recipe"]), base, counter, None)
    seeds = _check_seeds(raw.get("seeds"), base, runs)
    runs = with_seeds(runs, seeds)
    ids = [r.run_id for r in runs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"sweep has duplicate run ids {duplicates}; give the entries distinct 'id' values")
    which = (raw.get("evaluate") or {}).get("checkpoint", "best")
    if which not in CHECKPOINTS:
        raise ValueError(f"evaluate.checkpoint {which!r} is not valid; choose {' or '.join(CHECKPOINTS)} (best: the "
                         "model selected on the validation split)")
    nproc = raw.get("nproc_per_node", 1)
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc_per_node must be a positive integer, got {nproc!r}")
    check_measurement_options(raw.get("evaluate") or {}, raw.get("analysis") or {})
    workers = raw.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    cluster = str(raw.get("cluster", "auto"))
    if cluster not in CLUSTERS:
        raise ValueError(f"unknown cluster {cluster!r}; valid: {', '.join(CLUSTERS)}")
    return SweepSpec(
        name=str(raw.get("name", default_name)), recipe=str(raw["recipe"]), runs=runs, base=base,
        evaluate=dict(raw.get("evaluate") or {}), analysis=dict(raw.get("analysis") or {}),
        budget=dict(raw["budget"]) if raw.get("budget") else None,
        launcher=launcher, nproc_per_node=nproc, torchrun_args=[str(a) for a in raw.get("torchrun_args") or []],
        description=str(raw.get("description", "")), seeds=seeds,
        groups=[str(g.get("name", f"group{i + 1}")) for i, g in enumerate(raw.get("groups") or [])],
        workers=workers, cluster=cluster, slurm=slurm_parameters(raw), wait=bool(raw.get("wait", True)),
        budget_groups=[str(g.get("name", f"group{i + 1}")) for i, g in enumerate(raw.get("groups") or []) if g.get("budget")]
        or (["*"] if raw.get("budget") else []),
    )


def _expand_group(raw: Mapping[str, Any], recipe: str, base: Mapping[str, Any],
                  count_params: Callable[[str, Mapping[str, Any]], int], index: int | None) -> list[RunSpec]:
    """The runs of one group (or of a sweep without groups): grid x configs, then the budget filter/fit."""
    if index is not None:
        unknown = sorted(set(raw) - set(GROUP_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in group {index + 1}; valid: {', '.join(GROUP_KEYS)}")
    name = str(raw.get("name", f"group{index + 1}")) if index is not None else ""
    extra = dict(raw.get("set") or {}) if index is not None else {}
    points = [dict(p) for p in expand_grid(raw.get("grid"))] if raw.get("grid") or not raw.get("configs") else []
    for entry in raw.get("configs") or []:
        if not isinstance(entry, Mapping):
            raise ValueError(f"each entry of 'configs' must be a mapping of overrides, got {entry!r}")
        points.append(dict(entry))
    runs = [RunSpec(run_id_for(p), {**extra, **{k: v for k, v in p.items() if k != "id"}}) for p in points]
    if raw.get("budget"):
        runs = apply_budget(runs, dict(raw["budget"]), recipe, base, count_params)
    return [RunSpec(r.run_id, r.overrides, r.params, groups=(name,) if name else ()) for r in runs]


def _merge_groups(groups: list[list[RunSpec]]) -> list[RunSpec]:
    """Concatenate groups; a configuration in several groups (same id, same overrides) runs once, in all of them."""
    merged: dict[str, RunSpec] = {}
    for runs in groups:
        for run in runs:
            seen = merged.get(run.run_id)
            if seen is None:
                merged[run.run_id] = run
            elif seen.overrides == run.overrides:
                merged[run.run_id] = RunSpec(seen.run_id, seen.overrides, seen.params or run.params,
                                             groups=seen.groups + tuple(g for g in run.groups if g not in seen.groups))
            else:
                raise ValueError(f"configuration id {run.run_id!r} appears in groups {seen.groups + run.groups} with "
                                 "different overrides; give the entries distinct 'id' values")
    return list(merged.values())


def _check_seeds(seeds: Any, base: Mapping[str, Any], runs: Sequence[RunSpec]) -> list[int]:
    if seeds is None:
        return []
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers, e.g. [0, 1, 2, 3, 4], got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    if SEED_KEY in base or any(SEED_KEY in r.overrides for r in runs):
        raise ValueError(f"'seeds' sets {SEED_KEY} for every run; remove {SEED_KEY} from 'set', 'grid' and 'configs'")
    return list(seeds)


def with_seeds(runs: Sequence[RunSpec], seeds: Sequence[int]) -> list[RunSpec]:
    """Each configuration once per seed: id ``<config>_s<seed>``, override ``run.seed``; unchanged without seeds."""
    if not seeds:
        return [RunSpec(r.run_id, r.overrides, r.params, r.run_id, None, r.groups) for r in runs]
    return [RunSpec(f"{r.run_id}_s{seed}", {**r.overrides, SEED_KEY: seed}, r.params, r.run_id, seed, r.groups)
            for r in runs for seed in seeds]


EVALUATE_KEYS = ("attacks", "eps", "n", "checkpoint")
ANALYSIS_FLAGS = ("spectral", "bound", "lower", "theory", "spectra")
ANALYSIS_COUNTS = ("lower_points", "lower_iters", "attack_ratio_steps")


def check_measurement_options(evaluate: Mapping[str, Any], analysis: Mapping[str, Any]) -> None:
    """The sweep's ``evaluate`` and ``analysis`` settings, checked before any run trains (a bad attack name must
    not surface after the first run's training)."""
    from experiments.attacks import get_attack_preset
    from experiments.config import check_eps, parse_number

    for section, mapping, valid in (("evaluate", evaluate, EVALUATE_KEYS),
                                    ("analysis", analysis, ANALYSIS_FLAGS + ANALYSIS_COUNTS + ("rtol",))):
        if not isinstance(mapping, Mapping):
            raise ValueError(f"'{section}' must be a mapping with keys {', '.join(valid)}, got {mapping!r}")
        unknown = sorted(set(map(str, mapping)) - set(valid))
        if unknown:
            raise ValueError(f"unknown {section} key(s) {unknown}; valid: {', '.join(valid)}")
    attacks = evaluate.get("attacks", ["pgd20"])
    if not isinstance(attacks, list) or not attacks:
        raise ValueError(f"evaluate.attacks must be a non-empty list of attack names, e.g. [pgd20], got {attacks!r}")
    for name in attacks:
        get_attack_preset(str(name))  # unknown names: ValueError listing the presets
    if "eps" in evaluate:
        check_eps(parse_number(evaluate["eps"], "evaluate.eps"), "linf", "evaluate.eps")
    n = evaluate.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"evaluate.n must be a positive integer (or left out for all test points), got {n!r}")
    for key in ANALYSIS_FLAGS:
        if not isinstance(analysis.get(key, True), bool):
            raise ValueError(f"analysis.{key} must be true or false, got {analysis[key]!r}")
    for key in ANALYSIS_COUNTS:
        value = analysis.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"analysis.{key} must be a positive integer, got {value!r}")
    rtol = analysis.get("rtol", 0.02)
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 < rtol <= 1:
        raise ValueError(f"analysis.rtol must be a number in (0, 1], e.g. 0.05, got {rtol!r}")


def check_runs(spec: SweepSpec) -> None:
    """Every run's recipe with its overrides loads, validates and builds its model (on the meta device)."""
    from experiments.config import load_config
    from experiments.training.loop import check_run_config

    for run in spec.runs:
        try:
            check_run_config(load_config(spec.recipe, overrides=to_override_strings({**spec.base, **run.overrides})))
        except ValueError as exc:
            raise type(exc)(f"run {run.run_id}: {exc}") from None


@functools.lru_cache(maxsize=4096)
def _count_params_cached(recipe: str, frozen: str) -> int:
    from experiments.config import load_config
    from experiments.training.loop import model_skeleton

    config = load_config(recipe, overrides=to_override_strings(json.loads(frozen)))
    return int(sum(p.numel() for p in model_skeleton(config).parameters()))


def count_params_for(recipe: str, overrides: Mapping[str, Any]) -> int:
    """Parameter count of the model a recipe + overrides builds (built on the meta device: no memory, no init)."""
    return _count_params_cached(recipe, json.dumps(dict(overrides), sort_keys=True, default=str))


def apply_budget(runs: list[RunSpec], budget: Mapping[str, Any], recipe: str, base: Mapping[str, Any],
                 count_params: Callable[[str, Mapping[str, Any]], int]) -> list[RunSpec]:
    """Keep (optionally after fitting widths) the runs whose parameter count is within tolerance of the budget.

    ``fit: stage_widths`` rescales every stage width (the stem keeps its width) by one factor;
    ``fit: last_width`` changes only the last stage's width. The factor is found by bisection on the
    real parameter count, widths rounded to ``multiple_of``.
    """
    from experiments.parsing import parse_count

    unknown = sorted(set(budget) - set(BUDGET_KEYS))
    if unknown:
        raise ValueError(f"unknown budget key(s) {unknown}; valid: {', '.join(BUDGET_KEYS)}")
    if "params" not in budget:
        raise ValueError("budget needs 'params', e.g. params: 46.2M")
    target = parse_count(budget["params"])
    tolerance = float(budget.get("tolerance", 0.05))
    if not 0 < tolerance < 1:
        raise ValueError(f"budget tolerance must be in (0, 1), got {tolerance}")
    fit = budget.get("fit", "none") or "none"
    if fit not in BUDGET_FITS:
        raise ValueError(f"unknown budget fit {fit!r}; valid: {', '.join(BUDGET_FITS)}")
    multiple = int(budget.get("multiple_of", 1))
    kept = []
    for run in runs:
        overrides = {**base, **run.overrides}
        if fit != "none":
            if WIDTHS_KEY not in overrides:
                raise ValueError(f"budget fit {fit!r} needs {WIDTHS_KEY} in every run (set it in 'set', 'grid' or 'configs')")
            overrides[WIDTHS_KEY] = fit_widths(list(overrides[WIDTHS_KEY]), target, fit, multiple,
                                               lambda w: count_params(recipe, {**overrides, WIDTHS_KEY: w}))
        params = count_params(recipe, overrides)
        if abs(params - target) <= tolerance * target:
            own = {k: v for k, v in overrides.items() if k in run.overrides or k == WIDTHS_KEY and fit != "none"}
            new_id = run.run_id if fit == "none" or "id" in run.overrides else run_id_for(own)
            kept.append(RunSpec(new_id, own, params))
    if not kept:
        raise ValueError(f"no configuration lies within {tolerance:.0%} of the budget {target:,}; widen the grid or the tolerance")
    return kept


def fit_widths(widths: list[int], target: int, fit: str, multiple: int,
               count: Callable[[list[int]], int]) -> list[int]:
    """Scale stage widths (``stage_widths``) or the last width (``last_width``) so ``count`` is closest to ``target``."""
    def scaled(factor: float) -> list[int]:
        def rnd(w: float) -> int:
            return max(multiple, int(round(w / multiple)) * multiple)
        if fit == "last_width":
            return widths[:-1] + [rnd(widths[-1] * factor)]
        return widths[:1] + [rnd(w * factor) for w in widths[1:]]

    lo, hi = 1e-3, 1.0
    while count(scaled(hi)) < target and hi < 1e4:
        hi *= 2
    for _ in range(40):
        if all(abs(a - b) <= multiple for a, b in zip(scaled(lo), scaled(hi))):
            break
        mid = math.sqrt(lo * hi)
        if count(scaled(mid)) < target:
            lo = mid
        else:
            hi = mid
    candidates = {tuple(scaled(lo)), tuple(scaled(hi))}
    return list(min(candidates, key=lambda w: abs(count(list(w)) - target)))


def to_override_strings(overrides: Mapping[str, Any]) -> list[str]:
    """``{"run.epochs": 3, "model.overrides.widths": [8, 16]}`` -> ["run.epochs=3", "model.overrides.widths=[8, 16]"]."""
    out = []
    for key, value in overrides.items():
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
        if text.endswith("\n...") or text.endswith("..."):
            text = text.rsplit("\n", 1)[0].strip() if "\n" in text else text.replace("...", "").strip()
        out.append(f"{key}={text}")
    return out


# ----------------------------------------------------------------------------------------------
# execution
# ----------------------------------------------------------------------------------------------

Runner = Callable[[SweepSpec, RunSpec, Path, Mapping[str, Any]], "ModelRecord | dict"]


def is_finished(out_dir: Path, run: RunSpec) -> bool:
    """A run is finished when its record.json (or, written before, summary.json) exists and parses."""
    path = record_path(out_dir, run)
    if not path.is_file():
        return False
    try:
        json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return True


def torchrun_command(spec: SweepSpec, run: RunSpec, train_dir: Path, nproc_per_node: int, resume: bool) -> list[str]:
    """The command that trains one run as its own torchrun job."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc_per_node), *spec.torchrun_args,
           "-m", "experiments.cli", "train", spec.recipe, "--out", str(train_dir)]
    for text in to_override_strings({**spec.base, **run.overrides}):
        cmd += ["--set", text]
    if resume:
        cmd.append("--resume")
    return cmd


def train_run(spec: SweepSpec, run: RunSpec, run_dir: Path, options: Mapping[str, Any]) -> "ModelRecord":
    """Train one run (resuming an interrupted one), then measure it; returns the run's record."""
    from experiments.config import load_config, save_config
    from experiments.measure import measure_trained_run

    overrides = {**spec.base, **run.overrides}
    if options.get("device"):
        overrides["run.device"] = options["device"].split(":")[0]
    config = load_config(spec.recipe, overrides=to_override_strings(overrides))
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    train_dir = run_dir / "train"
    resume = train_dir.is_dir() and any(train_dir.iterdir())
    train_summary = _finished_training(train_dir)
    if train_summary is None:
        if options.get("launcher", spec.launcher) == "torchrun":
            cmd = torchrun_command(spec, run, train_dir, int(options.get("nproc_per_node") or spec.nproc_per_node), resume)
            with open(run_dir / "train.log", "a") as log:  # stdout to a log (keeps --json output clean); stderr shows progress
                completed = subprocess.run(cmd, stdout=log)
            if completed.returncode != 0:
                raise RuntimeError(f"torchrun job for run {run.run_id} failed with exit code {completed.returncode} "
                                   f"(log: {run_dir / 'train.log'}): {shlex.join(cmd)}")
            train_summary = _finished_training(train_dir) or {}
        else:
            from experiments.training import train

            train_summary = train(config, train_dir, resume=resume)
    model_file, measured = measured_checkpoint(train_dir, train_summary, spec.evaluate.get("checkpoint", "best"))
    evaluate_options = {k: v for k, v in spec.evaluate.items() if k != "checkpoint"}
    record = measure_trained_run(config, train_dir, train_summary, name=run.run_id,
                                 evaluate_options=evaluate_options, analysis_options=spec.analysis,
                                 device=options.get("device") or "cpu", seed=config.run.seed, model_file=model_file)
    record.update({"overrides": dict(run.overrides), "measured_checkpoint": measured})
    if record.train is None:
        record.update({"train": {}})
    record.train["measured_checkpoint"] = measured["description"]
    return record


def measured_checkpoint(train_dir: Path, train_summary: Mapping[str, Any] | None,
                        which: str = "best") -> tuple[Path, dict[str, Any]]:
    """The model file a sweep measures and a record of which it is.

    ``which="best"``: the model selected on the validation split (``model_best``, what the paper reports: it
    avoids robust overfitting after the first decay); a run without selection (``selection.metric: last``)
    has none, and its final model is measured, saying so. ``"final"``: the last weights.
    """
    from experiments.measure import find_trained_model

    summary = dict(train_summary or {})
    final = find_trained_model(train_dir, summary)
    selection = summary.get("selection") or {}
    best = Path(train_dir) / "model_best.safetensors"
    if which == "best" and selection.get("best_epoch", -1) >= 0 and best.is_file():
        text = (f"best (model_best, epoch {selection['best_epoch']}, selected by validation "
                f"{selection.get('metric')} = {selection.get('best_value')})")
        return best, {"kind": "best", "file": str(best), "epoch": selection["best_epoch"],
                      "selection_metric": selection.get("metric"), "description": text}
    epochs = summary.get("epochs_completed")
    reason = "" if which == "final" else " (the run has no selected model: selection.metric last)"
    return final, {"kind": "final", "file": str(final), "epoch": None if epochs is None else epochs - 1,
                   "selection_metric": selection.get("metric"), "description": f"final (model_final){reason}"}


def _finished_training(train_dir: Path) -> dict | None:
    from experiments.io import run_file

    path = run_file(train_dir, "train_summary")
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
    return None


def run_sweep(spec: SweepSpec, out_dir: str | Path, *, max_runs: int | None = None, launcher: str | None = None,
              nproc_per_node: int | None = None, dry_run: bool = False, only: Iterable[str] | None = None,
              aggregate_only: bool = False, device: str | None = None, runner: Runner | None = None,
              progress: bool = True, report: bool = True, workers: int | None = None, wait: bool | None = None,
              executor: Any = None, threads: int | None = None) -> dict[str, Any]:
    """Run the sweep's unfinished runs (at most ``max_runs`` new ones), then aggregate whatever is finished.

    Returns counts (total, done, ran, skipped), the run ids of each kind and the paths written.
    ``report=False`` skips the plots and report.md (results.json and table.csv are always written).
    ``workers`` (sequential launcher) runs that many runs in parallel processes; ``wait=False`` (submitit) submits
    and returns; ``executor`` replaces the submitit executor the sweep file describes (tests); ``threads``: torch
    threads of each local worker process.
    """
    out_dir = Path(out_dir)
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"--workers must be a positive integer, got {workers}")
    if launcher is not None and launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}")
    if max_runs is not None and max_runs < 0:
        raise ValueError(f"--max-runs must be >= 0, got {max_runs}")
    if runner is None and not aggregate_only:
        check_runs(spec)  # what the default runner will train: every recipe and model, before any run starts
    if dry_run:
        return _dry_run(spec, out_dir, only, launcher or spec.launcher, nproc_per_node or spec.nproc_per_node)
    with RunFolderLock(out_dir, "sweep"):
        return _run_sweep(spec, out_dir, max_runs=max_runs, launcher=launcher, nproc_per_node=nproc_per_node,
                          only=only, aggregate_only=aggregate_only, device=device, runner=runner, progress=progress,
                          report=report, workers=workers, wait=wait, executor=executor, threads=threads)


def _selected(spec: SweepSpec, only: Iterable[str] | None) -> list[RunSpec]:
    if not only:
        return list(spec.runs)
    only = list(only)
    known = {r.run_id for r in spec.runs}
    missing = [r for r in only if r not in known]
    if missing:
        raise ValueError(f"unknown run id(s) {missing}; this sweep's runs: {', '.join(sorted(known))}")
    return [r for r in spec.runs if r.run_id in only]


def _dry_run(spec: SweepSpec, out_dir: Path, only: Iterable[str] | None, launcher: str, nproc: int) -> dict[str, Any]:
    """What a real run would do, without writing anything."""
    runs = _selected(spec, only)
    todo = [r for r in runs if not is_finished(out_dir, r)]
    commands = [
        shlex.join(torchrun_command(spec, r, out_dir / "runs" / r.run_id / "train", nproc, False))
        if launcher == "torchrun" else f"train {r.run_id}: " + " ".join(to_override_strings({**spec.base, **r.overrides}))
        for r in todo
    ]
    return {"total": len(spec.runs), "skipped": len(runs) - len(todo),
            "skipped_ids": [r.run_id for r in runs if r not in todo], "ran": 0, "ran_ids": [], "commands": commands,
            "done": sum(is_finished(out_dir, r) for r in spec.runs)}


def _run_sweep(spec: SweepSpec, out_dir: Path, *, max_runs: int | None, launcher: str | None,
               nproc_per_node: int | None, only: Iterable[str] | None, aggregate_only: bool, device: str | None,
               runner: Runner | None, progress: bool, report: bool, workers: int | None, wait: bool | None,
               executor: Any, threads: int | None) -> dict[str, Any]:
    runs = _selected(spec, only)
    options = {"launcher": launcher or spec.launcher, "nproc_per_node": nproc_per_node or spec.nproc_per_node, "device": device,
               "threads": threads}
    write_text(out_dir / "sweep.json", json.dumps({
        "name": spec.name, "recipe": spec.recipe, "source": spec.source, "base": spec.base,
        "runs": [{"run_id": r.run_id, "overrides": r.overrides, "params": r.params} for r in spec.runs],
        "evaluate": spec.evaluate, "analysis": spec.analysis, "budget": spec.budget, "seeds": spec.seeds,
        "groups": spec.groups, "budget_groups": spec.budget_groups,
        "configs": {r.config: {"groups": list(r.groups)} for r in spec.runs},
    }, indent=2, default=str) + "\n")

    skipped = [r.run_id for r in runs if is_finished(out_dir, r)]
    todo = [r for r in runs if not is_finished(out_dir, r)]
    result: dict[str, Any] = {"total": len(spec.runs), "skipped": len(skipped), "skipped_ids": skipped, "ran": 0, "ran_ids": []}
    if not aggregate_only:
        from experiments import launch

        runner = runner or train_run
        if max_runs is not None:
            todo = todo[:max_runs]
        if options["launcher"] == "submitit":
            submitted = launch.submit_runs(spec, todo, out_dir, options, runner, executor=executor,
                                           wait=spec.wait if wait is None else wait)
            result.update(job_ids=submitted["job_ids"], failed=submitted.get("failed", {}))
            result["ran_ids"] = submitted.get("ran_ids", [])
            if submitted.get("failed"):
                first = next(iter(submitted["failed"].items()))
                raise RuntimeError(f"{len(submitted['failed'])} submitit job(s) failed, e.g. {first[0]}: {first[1]} "
                                   f"(logs in {out_dir / 'submitit'}); rerun the sweep to retry them")
        else:
            result["ran_ids"] = launch.run_local(spec, todo, out_dir, options, runner,
                                                 workers=workers or spec.workers, progress=progress)
        result["ran"] = len(result["ran_ids"])
    result["done"] = sum(is_finished(out_dir, r) for r in spec.runs)
    result.update(aggregate(spec, out_dir, report=report))
    return result


def aggregate(spec: SweepSpec, out_dir: str | Path, report: bool = True) -> dict[str, Any]:
    """Collect finished runs into results.json and table.csv, with rank correlations, plots and report.md; the
    per-configuration statistics and claims (``experiments.study``) go to results.json["study"] and configs.csv."""
    from experiments import report as reporting
    from experiments import study
    from experiments.io import write_json

    out_dir = Path(out_dir)
    models = [ModelRecord.from_dict(json.loads(record_path(out_dir, r).read_text()))
              for r in spec.runs if is_finished(out_dir, r)]
    if not models:
        return {"table": None, "report": None}
    analysis = study.analyse(models, spec.budget_groups)
    results = {
        "kind": "sweep", "name": spec.name, "description": spec.description, "models": [m.to_dict() for m in models],
        "correlations": reporting.correlations(models), "study": analysis,
        "provenance": {"sweep_file": spec.source, "recipe": spec.recipe, "runs_finished": f"{len(models)} of {len(spec.runs)}",
                       "seeds": spec.seeds or "one run per configuration (the recipe's run.seed)"},
    }
    write_json(out_dir / "results.json", results)
    table = reporting.write_csv(reporting.table_rows(models), out_dir / "table.csv")
    configs = study.write_configuration_csv(analysis, out_dir / "configs.csv")
    path = reporting.write_report(out_dir, regenerate=f"archlip sweep {spec.source or spec.name} --out {out_dir} --aggregate-only") if report else None
    return {"table": str(table), "configs": None if configs is None else str(configs),
            "report": None if path is None else str(path), "results": str(out_dir / "results.json")}
