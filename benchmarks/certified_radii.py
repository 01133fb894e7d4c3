"""Certified l2 robust radii per example on the adversarially trained digits WRN of P2 (lipschitz.local).

Trains the P2 model (wrn-tiny, PGD-AT linf 0.1, same seed and schedule), bounds it globally (lipsdp), then for
the first ``--n`` test points decides whether the pairwise-margin certificate holds on the l2 balls of radius
0.1 and 0.25 (local LipSDP constants with stable ReLUs substituted), beside PGD-l2 robust accuracy at those
radii (50 steps) on the same points and on the whole test split. Certified fraction <= PGD accuracy always
(a certified point cannot be broken); the gap is the certificate's looseness. Intervals: Clopper-Pearson 95%.
Prints a final summary line and writes benchmarks/results/certified_radii.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from _common import machine_name, timed  # noqa: E402


def clopper_pearson(k: int, n: int) -> list[float]:
    from experiments.stats import binomial_interval

    ci = binomial_interval(k, n)  # 95%, Clopper-Pearson
    return [ci.low, ci.high]


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=8, help="test points certified (local certificates are slow)")
    parser.add_argument("--radii", type=float, nargs="+", default=[0.1, 0.25])
    parser.add_argument("--passes", type=int, default=1, help="interval refinement passes per ball (2: tighter, 2x slower)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "certified_radii.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from lipschitz_tightness import train_pgd_at

    from experiments.attacks import pgd
    from experiments.data import load_digits
    from experiments.models import create_model
    from lipschitz.bounds import network_bound
    from lipschitz.local import certify_examples, prepare_local

    x_tr, y_tr = load_digits("train", seed=args.seed)
    x_te, y_te = load_digits("test", seed=args.seed)
    model = create_model("wrn-tiny", in_channels=1)
    train_pgd_at(model, x_tr, y_tr, epochs=args.epochs, eps=0.1, steps=5, lr=0.05, batch=64, seed=args.seed)
    model.eval()
    nb, w_glob, c_glob = timed(lambda: network_bound(model, (1, 8, 8), method="lipsdp", compare=False))
    ctx, w_ctx, c_ctx = timed(lambda: prepare_local(model, (1, 8, 8)))
    x, y = x_te[:args.n], y_te[:args.n]
    res, w_loc, c_loc = timed(lambda: certify_examples(None, x, y, "l2", eps_max=max(args.radii), steps=0,
                                                       global_bound=nb.value.value, probe=tuple(args.radii),
                                                       context=ctx, passes=args.passes))
    rows = {}
    for r in args.radii:
        k = sum(1 for q in res if q.certified_radius >= r)
        accs = {}
        for name, (xs, ys) in {"points": (x, y), "test_split": (x_te, y_te)}.items():
            adv = pgd(model, xs, ys, eps=r, norm="l2", steps=50, step_size=r / 8,
                      generator=torch.Generator().manual_seed(args.seed))
            with torch.no_grad():
                accs[name] = float((model(adv).argmax(1) == ys).float().mean())
        rows[str(r)] = {"certified_fraction": k / len(res), "certified_ci95": clopper_pearson(k, len(res)),
                        "pgd_l2_accuracy_points": accs["points"], "pgd_l2_accuracy_test_split": accs["test_split"]}
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    result = {"benchmark": "certified l2 radii, digits WRN (P2 model)", "n_points": len(res), "passes": args.passes, "clean_accuracy_points": clean,
              "global_lipsdp": nb.value.value, "radii": rows, "per_example": [q.to_dict() for q in res],
              "wall_s": {"global": w_glob, "context": w_ctx, "local": w_loc},
              "cpu_s": {"global": c_glob, "context": c_ctx, "local": c_loc},
              "threads": args.threads, "torch": torch.__version__, "machine": machine_name(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "note": "2-core machine shared with other jobs"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    parts = [f"r={r}: certified {v['certified_fraction']:.2f} (CI {v['certified_ci95'][0]:.2f}-{v['certified_ci95'][1]:.2f}) "
             f"vs PGD-l2 acc {v['pgd_l2_accuracy_points']:.2f}" for r, v in rows.items()]
    print(f"certified_radii: {len(res)} test points; " + "; ".join(parts) + f"; local {w_loc:.0f}s wall / {c_loc:.0f}s cpu")
    return result


if __name__ == "__main__":
    main()
