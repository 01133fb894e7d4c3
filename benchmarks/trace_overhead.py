"""P7: network_bound on a traced graph vs the former hand-written graph (WRN-34-10, random weights, 32x32).

``network_bound(model, shape)`` now traces the model with torch.fx (``lipschitz.graph_from_module``: trace, one
recorded run, the check against ``model(x)``) before composing the bounds. The baseline, measured in the same
run, is ``network_bound(graph, shape)`` on the graph WideResNet.lipschitz_graph() used to return (rebuilt by
``tests.reference.handwritten_graph``), which skips tracing. Both give the same numbers (checked here).
Goal: traced within 10% of the baseline. Also timed alone: ``graph_from_module`` (the whole overhead).
Prints a final summary line and writes benchmarks/results/trace_overhead.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads slow LAPACK on a shared machine

import torch  # noqa: E402
from _common import machine_name, timed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="wrn-34-10", help="a WideResNet/ResNet preset (default wrn-34-10)")
    parser.add_argument("--size", type=int, default=32, help="input height = width (default 32)")
    parser.add_argument("--method", default="folded+liplt", help="network_bound method (default folded+liplt)")
    parser.add_argument("--no-compare", action="store_true", help="evaluate only --method (default: all methods)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))  # tests.reference holds the former hand-written graphs
    from experiments.models import create_model
    from lipschitz import graph as G
    from lipschitz import graph_from_module, network_bound
    from tests.reference import handwritten_graph

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = create_model(args.model).eval()
    shape = (3, args.size, args.size)
    kw = {"method": args.method, "compare": not args.no_compare}
    network_bound(create_model("wrn-tiny").eval(), (3, 8, 8), **kw)  # warm-up: imports, LAPACK, fx codegen

    graph, trace_wall, trace_cpu = timed(lambda: graph_from_module(model, shape))
    base, base_wall, base_cpu = timed(lambda: network_bound(handwritten_graph(model), shape, **kw))
    traced, traced_wall, traced_cpu = timed(lambda: network_bound(model, shape, **kw))
    same = all(abs(traced.comparison[m] / base.comparison[m] - 1) <= 1e-12 for m in base.comparison)
    ratio_wall, ratio_cpu = traced_wall / base_wall, traced_cpu / base_cpu
    result = {
        "benchmark": "trace_overhead", "model": args.model, "input_shape": list(shape), **kw,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "machine": machine_name(), "torch": torch.__version__, "threads": args.threads,
        "load_average": list(os.getloadavg()),
        "graph_from_module": {"wall_s": trace_wall, "cpu_s": trace_cpu,
                              "nodes": sum(1 for _ in G.iter_nodes(graph))},
        "handwritten_graph": {"wall_s": base_wall, "cpu_s": base_cpu, "value": base.value.value},
        "traced_model": {"wall_s": traced_wall, "cpu_s": traced_cpu, "value": traced.value.value},
        "same_bounds": same, "comparison": traced.comparison,
        "ratio_wall": ratio_wall, "ratio_cpu": ratio_cpu,
        "overhead_share_wall": trace_wall / base_wall, "overhead_share_cpu": trace_cpu / base_cpu,
        "goal": "traced network_bound within 10% of the hand-written graph's",
        "goal_met": ratio_cpu <= 1.10 and same,
    }
    out = ROOT / "benchmarks" / "results" / "trace_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    verdict = "met" if result["goal_met"] else "NOT met"
    print(f"P7 {args.model} {args.size}x{args.size}: traced {traced_wall:.1f} s wall / {traced_cpu:.1f} s cpu, "
          f"hand-written graph {base_wall:.1f} / {base_cpu:.1f} s, ratio {ratio_wall:.3f} wall / {ratio_cpu:.3f} cpu "
          f"(graph_from_module alone {trace_wall:.2f} s wall / {trace_cpu:.2f} s cpu); same bounds: {same}; "
          f"goal <= 1.10: {verdict}")
    return result


if __name__ == "__main__":
    main()
