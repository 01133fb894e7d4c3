"""How a sweep's runs are executed: one run at a time, a local pool of worker processes, or submitit jobs.

Every launcher calls the same ``execute_run`` (train + measure one run, then write ``runs/<id>/record.json``),
so aggregation is the same whatever launched the runs, and a rerun skips whatever is finished:

- ``sequential`` with ``workers: 1`` (default): in this process, one after the other.
- ``sequential`` with ``workers: N``: N spawned worker processes on this machine (each keeps the recipe's
  torch thread count; ``workers: 2`` with ``run.num_threads: 1`` uses two cores).
- ``submitit``: one job per run (a SLURM job array on a cluster, subprocesses with ``cluster: local``), the
  executor configured by the sweep file's ``slurm_*`` keys (passed to ``submitit.AutoExecutor``), job logs in
  ``<out>/submitit/``. ``wait: false`` submits and returns; ``archlip sweep ... --aggregate-only`` collects later.
- ``torchrun``: handled inside ``sweep.train_run`` (one torchrun job per run, for multi-GPU training).

References: submitit (Facebook Research), https://github.com/facebookincubator/submitit.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from experiments.records import ModelRecord
    from experiments.sweep import RunSpec, SweepSpec

CLUSTERS = ("auto", "slurm", "local", "debug")


def record_path(out_dir: str | Path, run: "RunSpec") -> Path:
    """A run's record (``<out>/runs/<run_id>/record.json``; ``summary.json`` in sweeps written before); its presence
    marks the run finished."""
    from experiments.io import run_file

    return run_file(Path(out_dir) / "runs" / run.run_id, "record")


def execute_run(spec: "SweepSpec", run: "RunSpec", out_dir: str | Path, options: Mapping[str, Any],
                runner: Callable[..., Any]) -> "ModelRecord":
    """Train and measure one run with ``runner`` (the sweep's ``train_run``; a ``ModelRecord`` or its dict); write
    and return its record.

    The record gains ``config_id``, ``seed`` and ``groups`` (what aggregation groups runs by) and
    ``run_seconds``; ``record.json`` is written last, atomically, so a run counts as finished only when complete.
    """
    from experiments.io import RUN_FILES, remove_stale_temps, write_json
    from experiments.records import as_record

    out_dir = Path(out_dir)
    run_dir = out_dir / "runs" / run.run_id
    remove_stale_temps(run_dir)  # only this run's own temp files; one process runs one run folder at a time
    start = time.time()
    record = as_record(runner(spec, run, run_dir, options))
    record.update({k: v for k, v in (("name", run.run_id), ("params", run.params)) if not record.has(k)})
    record.update({"config_id": run.config, "seed": run.seed if run.seed is not None else record.seed,
                   "groups": list(run.groups), "run_seconds": time.time() - start})
    write_json(run_dir / RUN_FILES["record"][0], record.to_dict())
    return record


def _execute_in_worker(args: tuple) -> str:
    """Worker-process entry point of the local pool (module level so it pickles); sets the worker's torch threads."""
    import torch

    spec, run, out_dir, options, runner, threads = args
    torch.set_num_threads(threads)
    execute_run(spec, run, out_dir, options, runner)
    return run.run_id


def run_local(spec: "SweepSpec", runs: Sequence["RunSpec"], out_dir: Path, options: Mapping[str, Any],
              runner: Callable[..., dict] | None, *, workers: int = 1, progress: bool = True) -> list[str]:
    """Run ``runs`` here, one at a time (``workers=1``) or in ``workers`` spawned processes; returns the ids run.

    A failing run stops the sweep with its error (finished runs keep their summaries; rerun to continue). Each
    worker uses ``options["threads"]`` torch threads (default: the machine's cores divided by ``workers``).
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    bar = None
    if progress and runs:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs), desc=f"sweep {spec.name}", unit="run")
    done: list[str] = []
    try:
        if workers == 1:
            for run in runs:
                execute_run(spec, run, out_dir, options, runner)
                done.append(run.run_id)
                if bar is not None:
                    bar.update(1)
            return done
        import concurrent.futures as cf
        import multiprocessing
        import os

        threads = int(options.get("threads") or max(1, (os.cpu_count() or 1) // workers))
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_execute_in_worker, (spec, run, out_dir, dict(options), runner, threads)) for run in runs]
            for future in cf.as_completed(futures):
                done.append(future.result())
                if bar is not None:
                    bar.update(1)
        return done
    finally:
        if bar is not None:
            bar.close()


def slurm_parameters(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The ``slurm_*`` keys of a sweep mapping (passed unchanged to ``submitit.AutoExecutor.update_parameters``)."""
    return {k: v for k, v in raw.items() if isinstance(k, str) and k.startswith("slurm_")}


def make_executor(folder: Path, cluster: str = "auto", parameters: Mapping[str, Any] | None = None):
    """A ``submitit.AutoExecutor`` writing logs under ``folder`` (``cluster``: auto, slurm, local or debug)."""
    if cluster not in CLUSTERS:
        raise ValueError(f"unknown submitit cluster {cluster!r}; valid: {', '.join(CLUSTERS)}")
    try:
        import submitit
    except ImportError:
        raise ImportError("launcher 'submitit' needs the submitit package: pip install 'archlip[cluster]'") from None
    executor = submitit.AutoExecutor(folder=str(folder), cluster=None if cluster == "auto" else cluster)
    if parameters:
        executor.update_parameters(**dict(parameters))
    return executor


def submit_runs(spec: "SweepSpec", runs: Sequence["RunSpec"], out_dir: Path, options: Mapping[str, Any],
                runner: Callable[..., dict] | None = None, *, executor: Any = None, wait: bool = True) -> dict[str, Any]:
    """Submit one submitit job per run (a job array where the cluster supports it); optionally wait for them.

    Job ids go to ``<out>/submitit/jobs.json``. Returns ``{"job_ids": {run_id: job_id}, "ran_ids": [...],
    "failed": {run_id: error}}`` (``ran_ids``/``failed`` only when ``wait``).
    """
    if executor is None:
        executor = make_executor(out_dir / "submitit", spec.cluster, spec.slurm)
    jobs = {}
    if runs:
        with executor.batch():
            for run in runs:
                jobs[run.run_id] = executor.submit(execute_run, spec, run, str(out_dir), dict(options), runner)
    job_ids = {rid: str(job.job_id) for rid, job in jobs.items()}
    log = out_dir / "submitit" / "jobs.json"
    log.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(log.read_text()) if log.is_file() else {}
    log.write_text(json.dumps({**previous, **job_ids}, indent=2) + "\n")
    result: dict[str, Any] = {"job_ids": job_ids}
    if wait:
        ran, failed = [], {}
        for rid, job in jobs.items():
            try:
                job.result()
                ran.append(rid)
            except Exception as exc:  # noqa: BLE001 - a failed job is reported by id, the others still count
                failed[rid] = " ".join(str(exc).split())[-400:]
        result.update(ran_ids=ran, failed=failed)
    return result
