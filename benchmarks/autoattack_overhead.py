"""P5: AutoAttack (standard) through archlip's ``evaluate`` vs ``pyautoattack`` called directly.

Same model (a small MLP, PGD-trained for a few seconds on scikit-learn's digits), same points, same seed.
Runs alternate (direct, toolkit, toolkit, direct, ...) and repeat; end-to-end figures are ratios of medians
(and of minima) of CPU and wall time measured in this run. Because the toolkit calls pyautoattack for the same
attack work (same batches, same seeds), its own work is also timed directly: CPU time outside pyautoattack's
calls, relative to a direct run; on a shared machine that figure is far less noisy than the end-to-end ratio.
Goal: identical robust accuracy, overhead <= 5% (met when the own-work share and the better of the median/min
end-to-end ratios are both <= 5%).
The toolkit run includes everything it does around AutoAttack (clean pass and logit checks, eps-ball guards,
re-verification of every example, state files, summary/JSONL outputs, the duration estimate); the separate Yang et
al. metric is switched off (it is a different measurement, not AutoAttack). It runs pyautoattack's own loops
(``aa_engine="upstream"``) so that both sides do the same attack work; the faster exact engine is measured by P6
(``benchmarks/autoattack_speed.py``).

Usage: .venv/bin/python benchmarks/autoattack_overhead.py [--n 40] [--eps 0.1] [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from _common import machine_name as _machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "autoattack_overhead.json"


def _digits_model(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An MLP trained with a few epochs of PGD-AT on digits (so all four AutoAttack attacks have work)."""
    from sklearn.datasets import load_digits

    from experiments.attacks import pgd

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for epoch in range(8):
        order = train[torch.randperm(train.numel(), generator=g)]
        for i in range(0, order.numel(), 100):
            xb, yb = x[order[i:i + 100]], y[order[i:i + 100]]
            xa = pgd(model, xb, yb, eps=0.1, step_size=0.025, steps=5, generator=g) if epoch >= 2 else xb
            opt.zero_grad()
            F.cross_entropy(model(xa), yb).backward()
            opt.step()
    model.eval()
    return model, x[test], y[test]


def _run_direct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> float:
    from pyautoattack import AutoAttack

    rng = torch.get_rng_state()
    adversary = AutoAttack(model, norm="Linf", eps=eps, seed=seed, version="standard")
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=250)
    torch.set_rng_state(rng)
    with torch.no_grad():
        robust = (model(x_adv).argmax(1) == y) & (model(x).argmax(1) == y)
    return int(robust.sum()) / y.numel()


def _run_toolkit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> tuple[float, float]:
    """Robust accuracy, and the CPU seconds spent inside pyautoattack's run_standard_evaluation."""
    from pyautoattack import AutoAttack

    from experiments.evaluate import evaluate

    inside = [0.0]
    original = AutoAttack.run_standard_evaluation

    def timed(self, *args, **kwargs):
        c0 = time.process_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            inside[0] += time.process_time() - c0

    AutoAttack.run_standard_evaluation = timed
    try:
        with tempfile.TemporaryDirectory() as out:
            summary = evaluate(model, x, y, ["aa"], eps=eps, seed=seed, batch_size=250, out_dir=out,
                               progress=False, lipschitz_metric=False, aa_engine="upstream")
    finally:
        AutoAttack.run_standard_evaluation = original
    return summary["robust_accuracy"]["aa"], inside[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="number of test points (first n)")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs per side (alternating order)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: tiny model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, x_test, y_test = _digits_model(args.seed)
    x, y = x_test[:args.n], y_test[:args.n]
    runners = {"direct": _run_direct, "toolkit": _run_toolkit}
    order = []
    for r in range(args.repeats):
        order += ["direct", "toolkit"] if r % 2 == 0 else ["toolkit", "direct"]
    runs: dict[str, list[dict[str, float]]] = {"direct": [], "toolkit": []}
    for k, side in enumerate(order):
        c0, w0 = time.process_time(), time.perf_counter()
        out = runners[side](model, x, y, args.eps, args.seed)
        acc, inside = out if isinstance(out, tuple) else (out, None)
        run = {"cpu_time": time.process_time() - c0, "wall_time": time.perf_counter() - w0, "robust_accuracy": acc}
        if inside is not None:
            run["cpu_inside_pyautoattack"] = inside
            run["cpu_outside_pyautoattack"] = run["cpu_time"] - inside
        runs[side].append(run)
        print(f"[{k + 1}/{len(order)}] {side:8s} robust acc {acc:.4f}  cpu {run['cpu_time']:.2f}s  "
              f"wall {run['wall_time']:.2f}s"
              + (f"  (archlip's own work {run['cpu_outside_pyautoattack']:.3f}s cpu)" if inside is not None else ""),
              flush=True)
    accs = {side: sorted({r["robust_accuracy"] for r in rs}) for side, rs in runs.items()}
    same = accs["direct"] == accs["toolkit"] and len(accs["direct"]) == 1
    med = {side: {key: statistics.median(r[key] for r in rs) for key in ("cpu_time", "wall_time")}
           for side, rs in runs.items()}
    overhead_cpu = med["toolkit"]["cpu_time"] / med["direct"]["cpu_time"] - 1
    overhead_wall = med["toolkit"]["wall_time"] / med["direct"]["wall_time"] - 1
    best = {side: min(r["cpu_time"] for r in rs) for side, rs in runs.items()}
    overhead_cpu_min = best["toolkit"] / best["direct"] - 1
    # archlip's own work: CPU time of the toolkit run outside pyautoattack's calls (which do the same attack work
    # as the direct call: same batches, same seeds), relative to the direct run
    own = statistics.median(r["cpu_outside_pyautoattack"] for r in runs["toolkit"])
    overhead_own = own / med["direct"]["cpu_time"]
    spread = {side: [min(r["cpu_time"] for r in rs), max(r["cpu_time"] for r in rs)] for side, rs in runs.items()}
    result = {
        "benchmark": "autoattack_overhead",
        "goal": "same robust accuracy; toolkit overhead <= 5%",
        "setting": {"model": "MLP 64-64-10, 8 epochs (6 PGD-AT) on digits", "attack": "AutoAttack standard Linf",
                    "eps": args.eps, "n": args.n, "points": f"first {args.n} of a fixed held-out split",
                    "seed": args.seed, "repeats": args.repeats, "threads": args.threads, "order": order},
        "runs": runs,
        "median": med,
        "robust_accuracy": accs,
        "same_robust_accuracy": same,
        "overhead_cpu": overhead_cpu,
        "overhead_cpu_min": overhead_cpu_min,
        "overhead_wall": overhead_wall,
        "cpu_spread": spread,
        "own_work_cpu_seconds": own,
        "overhead_own_work": overhead_own,
        "meets_goal": bool(same and overhead_own <= 0.05 and min(overhead_cpu, overhead_cpu_min) <= 0.05),
        "torch": torch.__version__,
        "machine": _machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "note": "2 CPU cores, possibly shared with other jobs: cpu_time is the reliable figure, wall_time is noisy",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"P5 autoattack_overhead: robust acc direct {accs['direct']} toolkit {accs['toolkit']} "
          f"({'same' if same else 'DIFFERENT'}); archlip's own work {overhead_own:.2%} of a direct run; end-to-end "
          f"cpu {overhead_cpu:+.1%} (median) {overhead_cpu_min:+.1%} (min), wall {overhead_wall:+.1%} "
          f"(goal <= 5%: {'met' if result['meets_goal'] else 'NOT met'}); wrote {RESULTS}")


if __name__ == "__main__":
    main()
