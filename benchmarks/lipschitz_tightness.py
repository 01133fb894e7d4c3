"""P2: certified / data lower bound on an adversarially trained digits WRN, plain product vs folded + LipLT.

Trains a small WideResNet ("wrn-tiny", 1x8x8 digits) with a short PGD adversarial-training loop (linf),
then reports the certified l2 Lipschitz bounds (product, folded, folded+liplt; lipschitz.network_bound)
and lower bounds: the data lower bound (max per-sample Jacobian norm over the test split; attack-based l2
ratio) and the searched lower bound (``lipschitz.search.lower_bound_search``: Jacobian-norm ascent over the
input box [0, 1] from data, random and attack points, and the ratio search), and the ratio certified / lower
for each method (``ratio_certified_over_lower`` uses the larger, searched-or-data, lower bound; the ratio over
the data lower bound alone is kept beside it, and ``lower_share`` gives the lower bound's share of the change).
Goal: the folded + LipLT ratio >= 10x tighter than the product's.
Prints a final summary line and writes benchmarks/results/lipschitz_tightness.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from torch import nn
from _common import machine_name as _machine  # noqa: E402


def train_pgd_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, eps: float, steps: int,
                 lr: float, batch: int, seed: int) -> list[float]:
    """Plain PGD adversarial training (Madry et al. 2018) with SGD + cosine schedule; returns epoch losses."""
    from tqdm.auto import tqdm

    from experiments.attacks import pgd

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * ((len(x) + batch - 1) // batch))
    losses = []
    for _ in tqdm(range(epochs), desc="PGD-AT"):
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for s in range(0, len(x), batch):
            idx = perm[s:s + batch]
            xb, yb = x[idx], y[idx]
            x_adv = pgd(model, xb, yb, eps=eps, step_size=eps / 4, steps=steps, norm="linf", generator=gen)
            model.train()
            loss = nn.functional.cross_entropy(model(x_adv), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
        losses.append(total / len(x))
    model.eval()
    return losses


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="wrn-tiny")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--eps", type=float, default=0.1, help="linf training radius (pixels in [0, 1])")
    parser.add_argument("--pgd-steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--attack-eps", type=float, default=0.5, help="l2 ball radius of the attack ratio")
    parser.add_argument("--search-steps", type=int, default=100, help="ascent steps of the searched lower bound")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (recorded)")
    parser.add_argument("--sdp-iters", type=int, default=60, help="Adam steps of the LipSDP chain multipliers")
    parser.add_argument("--sdp-time", type=float, default=900.0, help="seconds of LipSDP multiplier optimisation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "lipschitz_tightness.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from experiments.attacks import pgd
    from experiments.data import load_digits
    from experiments.models import create_model
    from lipschitz.bounds import network_bound
    from lipschitz.sdp import SdpOptions
    from lipschitz.lower import attack_ratio_lower, jacobian_norm_lower
    from lipschitz.search import lower_bound_search

    w0, c0 = time.perf_counter(), time.process_time()
    x_tr, y_tr = load_digits("train", seed=args.seed)
    x_te, y_te = load_digits("test", seed=args.seed)
    model = create_model(args.model, in_channels=1)
    losses = train_pgd_at(model, x_tr, y_tr, epochs=args.epochs, eps=args.eps, steps=args.pgd_steps, lr=args.lr,
                          batch=args.batch, seed=args.seed)
    t_train = (time.perf_counter() - w0, time.process_time() - c0)
    with torch.no_grad():
        clean = float((model(x_te).argmax(1) == y_te).float().mean())
    x_adv = pgd(model, x_te, y_te, eps=args.eps, step_size=args.eps / 4, steps=10, norm="linf",
                generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        robust = float((model(x_adv).argmax(1) == y_te).float().mean())

    w1, c1 = time.perf_counter(), time.process_time()
    nb = network_bound(model, (1, 8, 8), sdp_options=SdpOptions(iters=args.sdp_iters, time_limit=args.sdp_time,
                                                                 max_work=None))  # --sdp-iters steps
    t_bound = (time.perf_counter() - w1, time.process_time() - c1)
    w2, c2 = time.perf_counter(), time.process_time()
    jac = jacobian_norm_lower(model, x_te, n_iter=50, tol=1e-6)
    att = attack_ratio_lower(model, x_te[:128], eps=args.attack_eps, norm="l2", steps=30)
    t_lower = (time.perf_counter() - w2, time.process_time() - c2)
    data_lower = max(jac.value, att.value)
    w3, c3 = time.perf_counter(), time.process_time()
    search = lower_bound_search(model, x_te, seed=args.seed, jacobian={"steps": args.search_steps},
                                ratio={"eps": args.attack_eps})
    t_search = (time.perf_counter() - w3, time.process_time() - c3)
    lower = max(data_lower, search.value)
    ratios = {m: v / lower for m, v in nb.comparison.items()}
    ratios_data_lower = {m: v / data_lower for m, v in nb.comparison.items()}
    found = search.best
    improvement = ratios["product"] / ratios["folded+liplt"]
    best_method = min(nb.comparison, key=nb.comparison.get)
    upper_share = nb.comparison["folded+liplt"] / nb.comparison[best_method]  # the upper side's factor (issue 14)
    result = {
        "benchmark": "P2 certified / data lower bound, adversarially trained digits WRN",
        "model": args.model, "training": {"epochs": args.epochs, "eps_linf": args.eps, "pgd_steps": args.pgd_steps,
                                          "lr": args.lr, "batch": args.batch, "final_loss": losses[-1]},
        "clean_accuracy": clean, "pgd10_accuracy": robust,
        "certified": nb.comparison, "certified_guarantee": nb.value.guarantee.value,
        "lower": {"jacobian_max": jac.value, "attack_ratio_l2": att.value, "data": data_lower,
                  "searched": search.value, "searched_jacobian": search.jacobian.value.value,
                  "searched_ratio": search.ratio.value.value, "searched_method": found.value.method,
                  "searched_found_by": found.found_by, "searched_start": found.start,
                  "searched_by_source": search.jacobian.by_source, "searched_steps": args.search_steps,
                  "jacobian_method": jac.method, "used": lower,
                  "guarantee": "lower", "jacobian_points": int(len(x_te)), "attack_points": 128},
        "ratio_certified_over_lower": ratios, "ratio_certified_over_data_lower": ratios_data_lower,
        "lower_share": {"data_lower": data_lower, "searched_lower": lower, "factor": lower / data_lower},
        "improvement_product_over_liplt": improvement, "goal_improvement": 10.0,
        "best_method": best_method, "ratio_best": ratios[best_method], "goal_ratio_best": 20.0,
        "upper_improvement_over_folded_liplt": upper_share,
        "sdp_options": {"iters": args.sdp_iters, "time_limit_s": args.sdp_time, "max_work": None},
        "blocks": nb.blocks, "stages": nb.stages,
        "wall_time": {"train": t_train[0], "bound": t_bound[0], "lower": t_lower[0], "search": t_search[0]},
        "cpu_time": {"train": t_train[1], "bound": t_bound[1], "lower": t_lower[1], "search": t_search[1]},
        "threads": args.threads, "torch": torch.__version__, "machine": _machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "note": "2-core machine, possibly shared with other jobs",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    status = "MET" if improvement >= 10 else "MISSED"
    print(f"P2 lipschitz_tightness: {args.model} PGD-AT clean {clean:.3f} pgd10 {robust:.3f}; lower {lower:.3g} "
          f"(data {data_lower:.3g}, searched {search.value:.3g}: {lower / data_lower:.2f}x, "
          f"{t_search[0]:.1f}s wall / {t_search[1]:.1f}s cpu); "
          f"certified/lower: product {ratios['product']:.3g}, folded {ratios['folded']:.3g}, "
          f"folded+liplt {ratios['folded+liplt']:.3g}, lipsdp {ratios['lipsdp']:.3g} (upper side {upper_share:.2f}x "
          f"tighter than folded+liplt; best ratio goal <= 20x: {'MET' if ratios[best_method] <= 20 else 'MISSED'}); "
          f"{improvement:.1f}x tighter (goal >= 10x: {status}); "
          f"bound {t_bound[0]:.1f}s wall / {t_bound[1]:.1f}s cpu")
    return result


if __name__ == "__main__":
    main()
