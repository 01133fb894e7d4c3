"""P4: per-sample Jacobian spectral norms at batch 64, torch.func.vmap vs a per-sample loop (same run).

Both paths run the same power iteration (J v as the vjp of u -> J^T u, then J^T (J v)) for the same
number of iterations from the same start vectors, so they compute the same numbers; the ratio of their
times is the speed-up. Goal: >= 5x. Prints a final summary line, writes benchmarks/results/jacobian_vmap.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch
from _common import machine_name as _machine, timed as _timed  # noqa: E402


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="wrn-tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (recorded)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "jacobian_vmap.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from experiments.models import create_model
    from lipschitz.lower import jacobian_norm_lower

    torch.manual_seed(0)
    model = create_model(args.model, in_channels=1).eval()
    x = torch.rand(args.batch, 1, 8, 8)
    jacobian_norm_lower(model, x[:2], n_iter=2, method="vmap")  # warm-up (torch.func first-call costs)
    jacobian_norm_lower(model, x[:2], n_iter=2, method="vmap", jvp="double_vjp")
    keys = [(m, j) for j in ("forward", "double_vjp") for m in ("vmap", "loop")]
    runs = {f"{m}/{j}": [] for m, j in keys}
    values = {}
    for _ in range(args.repeats):
        for method, jvp in keys:
            res, wall, cpu = _timed(lambda: jacobian_norm_lower(model, x, n_iter=args.iters, tol=0.0, jvp=jvp,
                                                                batch_size=args.batch, method=method))
            runs[f"{method}/{jvp}"].append({"wall_time": wall, "cpu_time": cpu})
            values[f"{method}/{jvp}"] = res.details["per_sample"]
    all_med = {k: statistics.median(r["wall_time"] for r in runs[k]) for k in runs}
    all_cpu = {k: statistics.median(r["cpu_time"] for r in runs[k]) for k in runs}
    # headline: the library default (forward-mode jvp) for both; also best loop vs best vmap over jvp modes
    med = {"vmap": all_med["vmap/forward"], "loop": all_med["loop/forward"]}
    med_cpu = {"vmap": all_cpu["vmap/forward"], "loop": all_cpu["loop/forward"]}
    best_vs_best = min(all_med["loop/forward"], all_med["loop/double_vjp"]) / min(
        all_med["vmap/forward"], all_med["vmap/double_vjp"])
    ref = values["loop/double_vjp"]
    max_rel_diff = max(abs(a - b) / max(abs(b), 1e-12) for k in values for a, b in zip(values[k], ref))
    result = {
        "benchmark": "P4 per-sample Jacobian norms, vmap vs loop",
        "model": args.model, "input_shape": [1, 8, 8], "batch": args.batch, "power_iterations": args.iters,
        "repeats": args.repeats, "threads": args.threads,
        "wall_time": all_med, "cpu_time": all_cpu, "runs": runs,
        "speedup_best_loop_vs_best_vmap_wall": best_vs_best,
        "speedup_wall": med["loop"] / med["vmap"], "speedup_cpu": med_cpu["loop"] / med_cpu["vmap"],
        "goal_speedup": 5.0, "max_rel_diff_vmap_vs_loop": max_rel_diff,
        "torch": torch.__version__, "machine": _machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "note": "2-core machine, possibly shared with other jobs; medians over repeats",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    status = "MET" if result["speedup_wall"] >= 5.0 else "MISSED"
    print(f"P4 jacobian_vmap: batch {args.batch}, {args.iters} iters: vmap {med['vmap']:.2f}s "
          f"(cpu {med_cpu['vmap']:.2f}s) vs loop {med['loop']:.2f}s (cpu {med_cpu['loop']:.2f}s): "
          f"{result['speedup_wall']:.1f}x wall, {result['speedup_cpu']:.1f}x cpu (goal >= 5x: {status}); "
          f"best loop vs best vmap over jvp modes {best_vs_best:.1f}x; "
          f"max rel diff {max_rel_diff:.1e}")
    return result


if __name__ == "__main__":
    main()
