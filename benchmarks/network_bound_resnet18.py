"""Issue 14: time of ``network_bound`` (all methods) on a CIFAR ResNet-18 at 32x32, goal <= 60 s on 2 cores.

Model: ``experiments.models`` ResNet-18 (3 input channels, 10 classes, widths 64/128/256/512). Weights: the
trained ones cached by ``benchmarks/spectral_resnet18.py`` under ``runs/bench_cache/`` when present (newest
file), otherwise Kaiming-normal (fan_out, seed ``--seed``) convolutions with perturbed batch-norm statistics
and affine parameters (so no scale folds to the identity). ``network_bound(model, (3, S, S))`` with its
default ``compare=True`` (every method), 2 torch threads, ``OMP_WAIT_POLICY=PASSIVE``.

Same run, same weights: the current circular LipLT path and, with ``--old``, the previous one
(``lipschitz.liplt.reference_path()``: every frequency, no reuse of results between methods and nodes); the
JSON holds both sets of values, their largest relative difference and both timings. Per method: cpu and wall
seconds (the folded+liplt and lipsdp methods include their layer sandwiches when they are the first to need
them). The machine is shared: cpu seconds / 2 is the wall estimate on 2 idle cores.

Run: ``.venv/bin/python benchmarks/network_bound_resnet18.py [--size 16] [--method folded+liplt] [--old]
[--profile]``. Writes ``benchmarks/results/network_bound_resnet18.json`` and prints a final summary line.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import cProfile  # noqa: E402
import datetime  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import machine_name, timed  # noqa: E402

CACHE = ROOT / "runs" / "bench_cache"
GOAL_SECONDS = 60.0


def build_model(seed: int, weights: str) -> tuple[nn.Module, str]:
    """ResNet-18 (3 -> 10): the cached trained weights (``weights="auto"`` and a cache file present) or Kaiming
    convolutions with perturbed batch-norm statistics."""
    from experiments.models import create_model

    torch.manual_seed(seed)
    model = create_model("resnet-18", in_channels=3)
    cached = sorted(CACHE.glob("resnet18_digits32_*.pt"), key=lambda p: p.stat().st_mtime)
    if weights == "auto" and cached:
        model.load_state_dict(torch.load(cached[-1], weights_only=True)["state_dict"])
        return model.eval(), f"trained ({cached[-1].relative_to(ROOT)})"
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
    return model.eval(), f"kaiming_normal fan_out, perturbed batch norms (seed {seed})"


@contextlib.contextmanager
def method_timer():
    """Per-method cpu/wall seconds of one ``network_bound(compare=True)`` call, by timing the engine's top-level
    evaluation of each method and the lipsdp pass (private hooks; empty if they are renamed)."""
    import lipschitz.bounds as B

    times: dict[str, dict[str, float]] = {}
    state = {"depth": 0}
    orig_eval, orig_pass = getattr(getattr(B, "_Engine", None), "evaluate", None), getattr(B, "_lipsdp_pass", None)
    if orig_eval is None or orig_pass is None:
        yield times
        return

    def add(name, wall, cpu):
        t = times.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
        t["wall_s"] += wall
        t["cpu_s"] += cpu

    def evaluate(self, *args, **kwargs):
        if state["depth"]:
            return orig_eval(self, *args, **kwargs)
        state["depth"] += 1
        w, c = time.perf_counter(), time.process_time()
        try:
            return orig_eval(self, *args, **kwargs)
        finally:
            state["depth"] -= 1
            add(self.method, time.perf_counter() - w, time.process_time() - c)

    def lipsdp_pass(*args, **kwargs):
        state["depth"] += 1  # engines inside the lipsdp pass count towards lipsdp
        w, c = time.perf_counter(), time.process_time()
        try:
            return orig_pass(*args, **kwargs)
        finally:
            state["depth"] -= 1
            add("lipsdp", time.perf_counter() - w, time.process_time() - c)

    B._Engine.evaluate, B._lipsdp_pass = evaluate, lipsdp_pass
    try:
        yield times
    finally:
        B._Engine.evaluate, B._lipsdp_pass = orig_eval, orig_pass


def run_once(model: nn.Module, size: int, method: str | None, profile: bool) -> dict:
    from lipschitz.bounds import network_bound

    kw = {"compare": True} if method is None else {"method": method, "compare": False}
    prof = cProfile.Profile(time.process_time) if profile else None
    with method_timer() as per_method:
        if prof is not None:
            prof.enable()
        res, wall, cpu = timed(lambda: network_bound(model, (3, size, size), **kw))
        if prof is not None:
            prof.disable()
    out = {"wall_s": wall, "cpu_s": cpu, "per_method": per_method, "values": dict(res.comparison),
           "blocks": [{"name": b["name"], **{m: b.get(m) for m in res.comparison}} for b in res.blocks]}
    if prof is not None:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
        out["profile_top_cumulative"] = buf.getvalue()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(20)
        out["profile_top_tottime"] = buf.getvalue()
    return out


def max_rel_diff(a: dict, b: dict) -> float:
    return max((abs(a[k] - b[k]) / abs(b[k]) for k in a if k in b and b[k]), default=0.0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="input height = width (default 32)")
    parser.add_argument("--method", default=None, help="one method (compare=False) instead of all of them")
    parser.add_argument("--old", action="store_true", help="also run the previous circular LipLT path (same run)")
    parser.add_argument("--profile", action="store_true", help="cProfile (cpu time); top entries in the JSON")
    parser.add_argument("--weights", choices=("auto", "kaiming"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "network_bound_resnet18.json")
    args = parser.parse_args(argv)
    from lipschitz import liplt

    torch.set_num_threads(args.threads)
    model, weights = build_model(args.seed, args.weights)
    started = datetime.datetime.now(datetime.timezone.utc)
    load = os.getloadavg()
    new = run_once(model, args.size, args.method, args.profile)
    print(f"new: {new['cpu_s']:.1f} s cpu / {new['wall_s']:.1f} s wall  {new['values']}", flush=True)
    old = None
    if args.old:
        with liplt.reference_path():
            old = run_once(model, args.size, args.method, args.profile)
        print(f"old: {old['cpu_s']:.1f} s cpu / {old['wall_s']:.1f} s wall  {old['values']}", flush=True)
    est = new["cpu_s"] / args.threads
    result = {
        "benchmark": "network_bound_resnet18", "goal": f"network_bound (all methods) <= {GOAL_SECONDS:.0f} s on 2 cores",
        "model": "resnet-18 (3x{0}x{0}, 10 classes)".format(args.size), "weights": weights,
        "method": args.method or "all (compare=True)", "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "machine": machine_name(),
        "torch": torch.__version__, "date": started.isoformat(timespec="seconds"),
        "load_average_at_start": [round(x, 2) for x in load], "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "new": new, "old": old,
        "max_rel_diff_new_vs_old": None if old is None else max_rel_diff(new["values"], old["values"]),
        "speedup_cpu": None if old is None else old["cpu_s"] / new["cpu_s"],
        "idle_wall_estimate_s": est, "goal_met_idle_estimate": bool(args.size == 32 and est <= GOAL_SECONDS),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    line = (f"network_bound resnet-18 {args.size}x{args.size} [{result['method']}]: {new['cpu_s']:.1f} s cpu / "
            f"{new['wall_s']:.1f} s wall on {args.threads} threads (idle estimate {est:.1f} s, goal {GOAL_SECONDS:.0f} s: "
            f"{'met' if result['goal_met_idle_estimate'] else 'not met'})")
    if old is not None:
        line += (f"; old path {old['cpu_s']:.1f} s cpu / {old['wall_s']:.1f} s wall ({result['speedup_cpu']:.2f}x cpu), "
                 f"values max rel diff {result['max_rel_diff_new_vs_old']:.2e}")
    print(line)
    return result


if __name__ == "__main__":
    main()
