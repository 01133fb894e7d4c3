"""CLI thread default: wall and cpu time of the CLI's CPU workloads with 1 thread vs torch's default thread count,
with and without ``OMP_WAIT_POLICY=PASSIVE``, measured interleaved in one run (the machine is shared: load hits
every variant alike). Each measurement is a fresh subprocess, because OpenMP reads its wait policy once, when
torch starts its thread pool.

Workloads (the digits-sized models the README's commands run on a CPU):
- ``pgd``: ``evaluate`` with PGD-20 on 128 digits test points (``archlip eval ... --attacks pgd20``);
- ``aa``: ``evaluate`` with standard AutoAttack (APGD-CE only, the first of its four attacks) on 16 points;
- ``bound``: certified network bound + data lower bounds on 32 points (``archlip bound``);
- ``spectral``: per-layer sandwiches of wrn-16-4 at 3x32x32 (``archlip spectral wrn-16-4``: larger layers).

Usage: python benchmarks/cli_threads.py [--reps 3] [--workloads pgd,aa,bound,spectral]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "cli_threads.json"
#: variant -> (threads or None for torch's default, OMP_WAIT_POLICY or None for unset)
VARIANTS = {"1 thread, passive": (1, "PASSIVE"), "default threads, unset": (None, None),
            "default threads, passive": (None, "PASSIVE")}
WORKLOADS = ("pgd", "aa", "bound", "spectral")


def worker(workload: str, checkpoint: str, threads: int | None) -> None:
    """Run one workload in this process (the parent set the environment) and print its wall/cpu seconds."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    from experiments.checkpoints import load_checkpoint
    from experiments.data import load_digits

    model = load_checkpoint(checkpoint).model.eval()
    x, y = load_digits("test")
    wall, cpu = time.perf_counter(), time.process_time()
    if workload in ("pgd", "aa"):
        from experiments.attacks import autoattack_custom
        from experiments.evaluate import evaluate

        attacks = ["pgd20"] if workload == "pgd" else [autoattack_custom(["apgd-ce"])]
        evaluate(model, x, y, attacks, eps=0.1, n=128 if workload == "pgd" else 16, progress=False,
                 lipschitz_metric=False)
    elif workload == "bound":
        from experiments.measure import bound_summary, data_lower_bounds

        bound_summary(model, (1, 8, 8), rtol=0.05)
        data_lower_bounds(model, x[:32], y[:32], eps=0.1, n_iter=20, attack_steps=10)
    else:
        from experiments.measure import layer_table
        from experiments.models import create_model

        torch.manual_seed(0)
        layer_table(create_model("wrn-16-4").eval(), (3, 32, 32), rtol=0.05)
    print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                      "threads": torch.get_num_threads()}))


def _checkpoint(folder: Path) -> Path:
    """A digits model trained for one short epoch (robust enough that the attacks have points to work on)."""
    from experiments.config import load_config
    from experiments.training import train

    cfg = load_config("digits-pgdat-tiny", ["run.epochs=2", "data.train_limit=512", "run.progress=false",
                                            "selection.metric=last", "data.val_size=0"])
    return Path(train(cfg, folder / "train")["files"]["final_model"])


def _measure(workload: str, checkpoint: Path, variant: str) -> dict:
    threads, policy = VARIANTS[variant]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, __file__, "--worker", workload, "--checkpoint", str(checkpoint)]
    if threads is not None:
        command += ["--threads", str(threads)]
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="rounds; each runs every variant once, in random order")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.checkpoint, args.threads)
        return
    workloads = [w for w in args.workloads.split(",") if w]
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = _checkpoint(Path(tmp))
        rows = []
        for rep in range(args.reps):
            for workload in workloads:
                order = list(VARIANTS)
                rng.shuffle(order)
                for variant in order:
                    row = {"rep": rep, "workload": workload, "variant": variant, **_measure(workload, checkpoint, variant)}
                    rows.append(row)
                    print(f"  {workload:9s} {variant:26s} wall {row['wall']:7.2f} s  cpu {row['cpu']:7.2f} s", flush=True)
    summary = {}
    for workload in workloads:
        med = {}
        for variant in VARIANTS:
            walls = sorted(r["wall"] for r in rows if r["workload"] == workload and r["variant"] == variant)
            cpus = sorted(r["cpu"] for r in rows if r["workload"] == workload and r["variant"] == variant)
            med[variant] = {"wall_median": walls[len(walls) // 2], "cpu_median": cpus[len(cpus) // 2]}
        base = med["1 thread, passive"]["wall_median"]
        for variant in VARIANTS:
            med[variant]["wall_vs_1_thread"] = med[variant]["wall_median"] / base
        summary[workload] = med
    load = os.getloadavg()
    import torch

    from _common import machine_name

    result = {"benchmark": "cli_threads", "date": datetime.date.today().isoformat(), "machine": machine_name(),
              "cpus": os.cpu_count(), "load_average_at_end": load, "torch": torch.__version__, "reps": args.reps,
              "summary": summary, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    ratios = ", ".join(f"{w}: default/1 thread {summary[w]['default threads, unset']['wall_vs_1_thread']:.2f}x unset, "
                       f"{summary[w]['default threads, passive']['wall_vs_1_thread']:.2f}x passive" for w in workloads)
    print(f"cli_threads: wall-time ratios (median of {args.reps}, load {load[0]:.1f} on {os.cpu_count()} cpus): {ratios}")


if __name__ == "__main__":
    main()
