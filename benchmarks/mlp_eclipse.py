"""MLP comparison: our certified l2 Lipschitz bound (method "lipsdp") beside ECLipsE-Fast (Xu & Sivaranjani,
NeurIPS 2024; PyPI ``eclipse-nn``, a dev-only dependency) on 64-128-...-10 ReLU MLPs on digits.

Depth = number of linear layers (2: 64-128-10; 8: seven hidden layers of 128). For each depth a randomly
initialised net (torch's default init) and one trained on digits (Adam, cross-entropy) are bounded. Goal:
ours / ECLipsE-Fast <= 1.0 on every net. ECLipsE-Fast's value is a float64 computation without round-off
margin; ours is verified (docs/network-bounds.md). Both timed (wall and cpu seconds).
Prints a final summary line and writes benchmarks/results/mlp_eclipse.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
from torch import nn

from _common import machine_name, timed  # noqa: E402


def make_mlp(depth: int, width: int = 128, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    dims = [64] + [width] * (depth - 1) + [10]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def train(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), 64):
            idx = perm[s:s + 64]
            loss = nn.functional.cross_entropy(model(x[idx].flatten(1)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return float(loss)


def eclipse_fast(model: nn.Sequential) -> float:
    from eclipse_nn import ECLipsE_Fast

    weights = [m.weight.detach().double() for m in model if isinstance(m, nn.Linear)]
    n_act = len(weights) - 1
    return float(ECLipsE_Fast(weights, [0.0] * n_act, [1.0] * n_act))


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "mlp_eclipse.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import eclipse_nn  # noqa: F401
    except ImportError:
        raise SystemExit("eclipse-nn is not installed: pip install -e '.[dev]' (it is a dev-only dependency)")
    from experiments.data import load_digits
    from lipschitz.bounds import network_bound

    x_tr, y_tr = load_digits("train", seed=args.seed)
    x_te, y_te = load_digits("test", seed=args.seed)
    rows = []
    for depth in args.depths:
        for kind in ("random", "trained"):
            model = make_mlp(depth, seed=args.seed + depth)
            acc = None
            if kind == "trained":
                train(model, x_tr, y_tr, args.epochs, args.seed)
                with torch.no_grad():
                    acc = float((model(x_te.flatten(1)).argmax(1) == y_te).float().mean())
            model.eval()
            nb, w_ours, c_ours = timed(lambda: network_bound(model, (64,), method="lipsdp", compare=False))
            ef, w_ef, c_ef = timed(lambda: eclipse_fast(model))
            ours = nb.comparison["lipsdp"]
            rows.append({"depth": depth, "kind": kind, "test_accuracy": acc, "ours_lipsdp": ours,
                         "ours_guarantee": nb.value.guarantee.value, "ours_folded_liplt": nb.comparison["folded+liplt"],
                         "eclipse_fast": ef, "ratio_ours_over_eclipse_fast": ours / ef,
                         "wall_s": {"ours": w_ours, "eclipse_fast": w_ef}, "cpu_s": {"ours": c_ours, "eclipse_fast": c_ef}})
            print(f"depth {depth} {kind:7s}: ours {ours:.4g} ({w_ours:.1f}s)  ECLipsE-Fast {ef:.4g} ({w_ef:.2f}s)  "
                  f"ratio {ours / ef:.3f}  (folded+liplt {nb.comparison['folded+liplt']:.4g})", flush=True)
    worst = max(r["ratio_ours_over_eclipse_fast"] for r in rows)
    result = {"benchmark": "MLP: certified lipsdp vs ECLipsE-Fast", "rows": rows, "worst_ratio": worst, "goal": 1.0,
              "threads": args.threads, "torch": torch.__version__, "machine": machine_name(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "note": "2-core machine shared with other jobs; wall and cpu seconds recorded"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    status = "MET" if worst <= 1.0 else "MISSED"
    print(f"mlp_eclipse: ours / ECLipsE-Fast worst {worst:.3f} over {len(rows)} MLPs (goal <= 1.0: {status})")
    return result


if __name__ == "__main__":
    main()
