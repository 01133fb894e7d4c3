"""P8: standard AutoAttack on the digits test set: archlip (exact engine) vs pyautoattack called directly.

The model is the demo's `digits-pgdat-tiny` WideResNet (trained here in ~15 s with the demo's recipe unless
--checkpoint is given); the points are the 359 digits test points; Linf eps 0.1 (its training eps), seed 0,
batch size 250 (pyautoattack's default). Each run is a fresh subprocess, so thread settings and CPU times
(user + sys of that process) are its own:

- `direct-default`: `AutoAttack(model, norm="Linf", eps=0.1, seed=0, version="standard")
  .run_standard_evaluation(x, y)` with torch's default thread count, as a user would call it;
- `direct-1t`: the same with one torch thread (model calls counted with a forward hook);
- `archlip-1t`: `experiments.evaluate.evaluate(model, x, y, ["aa"], eps=0.1)` with one thread: the exact
  engine (`experiments/autoattack_engine.py`), plus archlip's own checks, state files and outputs.

Goal (issue 17): archlip >= 3x faster than `direct-default`, robust accuracy no higher, per-example robust flags
identical. The summary also gives the ratio at equal threads (`direct-1t`), attack by attack, with the model
rows (points x passes) each side sent: where the engine cannot skip work, the attack itself needs it.

Usage: .venv/bin/python benchmarks/autoattack_speed.py [--n 359] [--runs direct-default,direct-1t,archlip-1t]
       [--default-timeout 1800] [--checkpoint PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "autoattack_speed.json"
RUNS = ("direct-default", "direct-1t", "archlip-1t")
ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
WHY = {
    "apgd-ce": "every one of the 100 steps of a point that stays robust is part of the attack (one forward and one "
               "backward pass each); the engine skips only misclassified points and iterates that did not move",
    "apgd-t": "9 targets x 100 steps, each a forward+backward pass, for every point that stays robust: required by "
              "the attack; skipped: misclassified points, unmoved iterates",
    "fab-t": "9 targets x 100 steps, each a gradient pass at the iterate and a forward check of the next one, for "
             "every point not yet broken within eps: required by the attack; removed: the weight gradients "
             "upstream's .backward() computes, one clean pass per target, points broken within eps",
    "square": "most of its 5000 queries per point repeat a (window, sign) query at an unchanged best example, or "
              "leave the input unchanged: their answer is known and they are not re-sent",
}


def _setup(checkpoint: str | None, n: int, work: Path):
    import torch

    from experiments.datasets import load_eval_data
    from experiments.targets import load_target

    if checkpoint is None:
        checkpoint = str(work / "train" / "model_best.safetensors")
    model, _ = load_target(checkpoint, data=None, device=torch.device("cpu"))
    x, y = load_eval_data("digits", root=None)
    return model.eval(), x[:n], y[:n]


def _train(work: Path) -> None:
    from experiments.config import load_config
    from experiments.training import train

    train(load_config("digits-pgdat-tiny", overrides=["run.progress=false"]), work / "train")


class _Log(logging.Handler):
    """pyautoattack's 'robust accuracy after X: ...% (total time T s)' lines, for per-attack wall times."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _direct_times(lines: list[str]) -> dict[str, float]:
    out, last = {}, 0.0
    for line in lines:
        if line.startswith("robust accuracy after "):
            name = line.split("after ", 1)[1].split(":", 1)[0].lower()
            total = float(line.rsplit("total time ", 1)[1].split(" s", 1)[0])
            out[name], last = total - last, total
    return out


def _row_counter(model):
    """Forward hook counting input rows, split by grad mode (a grad-mode forward is followed by a backward)."""
    import torch

    counts = {"forward_rows": 0, "backward_rows": 0}

    def hook(_module, inputs, _output):
        counts["backward_rows" if torch.is_grad_enabled() else "forward_rows"] += int(inputs[0].shape[0])

    return counts, model.register_forward_hook(hook)


def worker(run: str, args: argparse.Namespace) -> dict:
    import torch

    if run.endswith("-1t"):
        torch.set_num_threads(1)
    model, x, y = _setup(args.checkpoint, args.n, Path(args.work))
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    out: dict = {"run": run, "threads": torch.get_num_threads()}
    if run.startswith("direct"):
        from pyautoattack import AutoAttack

        log = _Log()
        logging.getLogger("auto-attack").addHandler(log)
        logging.getLogger("auto-attack").setLevel(logging.DEBUG)
        counts, handle = _row_counter(model) if run == "direct-1t" else ({}, None)
        adversary = AutoAttack(model, norm="Linf", eps=args.eps, seed=args.seed, version="standard")
        x_adv, _ = adversary.run_standard_evaluation(x, y)
        with torch.no_grad():
            robust = (model(x_adv).argmax(1) == y) & (model(x).argmax(1) == y)
        out["attack_wall"] = _direct_times(log.lines)
        if handle is not None:
            handle.remove()
            out["model_rows"] = counts
    else:
        from experiments.evaluate import evaluate

        with tempfile.TemporaryDirectory() as tmp:
            summary = evaluate(model, x, y, ["aa"], eps=args.eps, seed=args.seed, out_dir=tmp, progress=False,
                               lipschitz_metric=False)
            entry = json.loads((Path(tmp) / "eval_state.json").read_text())["attacks"]["aa"]
            rows = [json.loads(line) for line in (Path(tmp) / "per_example.jsonl").read_text().splitlines()]
        robust = torch.tensor([r["robust"]["aa"] for r in rows])
        out.update(attack_wall=entry["attack_seconds"], model_rows=entry.get("model_rows"),
                   engine=entry["settings"]["engine"], estimate_seconds=summary["estimate"]["seconds"])
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    out.update(wall=time.perf_counter() - t0, cpu=(r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
               robust=[bool(v) for v in robust.tolist()], robust_accuracy=float(robust.double().mean()))
    return out


def _spawn(run: str, args: argparse.Namespace, timeout: float | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", run, "--n", str(args.n), "--eps", str(args.eps), "--seed",
           str(args.seed), "--work", args.work] + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"} if run.endswith("-1t") else dict(os.environ)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"run": run, "timed_out": True, "wall": time.perf_counter() - t0}
    if proc.returncode != 0:
        raise RuntimeError(f"{run} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compare(res: dict[str, dict]) -> dict:
    ours = res.get("archlip-1t")
    out: dict = {}
    for base in ("direct-default", "direct-1t"):
        b = res.get(base)
        if not ours or not b:
            continue
        if b.get("timed_out"):
            out[base] = {"wall_speedup_at_least": b["wall"] / ours["wall"], "note": "direct run stopped at the timeout"}
            continue
        out[base] = {"cpu_speedup": b["cpu"] / ours["cpu"], "wall_speedup": b["wall"] / ours["wall"],
                     "flags_identical": b["robust"] == ours["robust"],
                     "robust_accuracy": {"direct": b["robust_accuracy"], "archlip": ours["robust_accuracy"]}}
    d1 = res.get("direct-1t")
    if ours and d1 and not d1.get("timed_out"):
        out["per_attack_equal_threads"] = {
            a: {"direct_wall": d1["attack_wall"].get(a), "archlip_wall": ours["attack_wall"].get(a),
                "speedup": (d1["attack_wall"][a] / ours["attack_wall"][a]
                            if d1["attack_wall"].get(a) and ours["attack_wall"].get(a) else None),
                "why": WHY[a]} for a in ATTACKS}
        out["model_rows"] = {"direct-1t": d1.get("model_rows"), "archlip-1t": ours.get("model_rows")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=359, help="first n digits test points (default all 359)")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    parser.add_argument("--default-timeout", type=float, default=1800.0,
                        help="seconds after which the default-threads direct run is stopped (reported as a bound)")
    parser.add_argument("--checkpoint", default=None, help="a digits checkpoint instead of training the demo recipe")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    runs = [r for r in args.runs.split(",") if r]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; valid: {', '.join(RUNS)}")
    import torch
    from _common import machine_name

    with tempfile.TemporaryDirectory() as work:
        args.work = work
        if args.checkpoint is None:
            t0 = time.perf_counter()
            _train(Path(work))
            print(f"trained digits-pgdat-tiny in {time.perf_counter() - t0:.0f} s", flush=True)
        res = {}
        for run in runs:
            res[run] = _spawn(run, args, args.default_timeout if run == "direct-default" else None)
            r = res[run]
            print(f"{run:15s} " + ("timed out" if r.get("timed_out") else
                  f"robust acc {r['robust_accuracy']:.4f}  cpu {r['cpu']:.1f}s  wall {r['wall']:.1f}s  "
                  f"per attack (wall) {json.dumps({k: round(v, 1) for k, v in r['attack_wall'].items()})}"),
                  flush=True)
    cmp = _compare(res)
    result = {"benchmark": "autoattack_speed", "goal": "archlip >= 3x faster than direct-default; robust accuracy "
              "no higher; per-example flags identical",
              "setting": {"model": "digits-pgdat-tiny (the demo's recipe)" if not args.checkpoint else args.checkpoint,
                          "n": args.n, "eps": args.eps, "seed": args.seed, "attack": "AutoAttack standard Linf",
                          "batch_size": 250},
              "runs": res, "comparison": cmp, "torch": torch.__version__, "machine": machine_name(),
              "cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    parts = []
    for base, c in cmp.items():
        if base.startswith("direct"):
            parts.append(f"vs {base}: " + (f">= {c['wall_speedup_at_least']:.1f}x wall (timed out)" if "note" in c else
                         f"{c['cpu_speedup']:.2f}x cpu, {c['wall_speedup']:.2f}x wall, flags "
                         f"{'identical' if c['flags_identical'] else 'DIFFERENT'}"))
    print(f"P6 autoattack_speed: {'; '.join(parts)}; wrote {RESULTS}")


if __name__ == "__main__":
    main()
