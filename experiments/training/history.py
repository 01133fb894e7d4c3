"""Per-epoch robustness history on the validation split (the paper code's ``pgd_eval_history``,
``stable_acc_history`` and ``lip_history``), sharded over data-parallel ranks.

For each measured epoch: clean accuracy; PGD-k accuracy (uniform start, step ``pgd_step_fraction * eps``,
PGD-20 with step 0.8/255 at 8/255 by default, as the paper's evaluation); stable accuracy (the prediction at
the PGD example equals the clean prediction); the local Lipschitz ratio ``||f(x) - f(x')||_1 / ||x - x'||_inf``
at the PGD examples x' (the paper code's ``lip_history``; averaged over examples here, where the paper code
averages batch means), and optionally Yang et al.'s own metric with its named step rule.

References: Huang et al. 2021 (the logged histories); Yang et al. 2020 (local Lipschitz, stable accuracy).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from experiments.config import TrainConfig, effective_attack_numbers
import experiments.training.distributed as D

HISTORY_KEYS = ("val_hist_clean_acc", "val_hist_pgd_acc", "val_hist_stable_acc", "val_hist_local_lipschitz",
                "val_hist_yang_lipschitz", "val_hist_yang_stable_acc")


def history_due(cfg: TrainConfig, epoch: int) -> bool:
    """Whether the history is measured after ``epoch`` (0-based)."""
    h = cfg.history
    last = epoch + 1 == cfg.run.epochs
    return h.enabled and epoch >= h.start_epoch and ((epoch - h.start_epoch) % h.every == 0 or last)


def history_settings(cfg: TrainConfig) -> dict[str, Any]:
    """What the history keys measure (written to the run summary beside them)."""
    h = cfg.history
    eps, _ = effective_attack_numbers(cfg.attack)
    out = {"points": "validation split" + (f", first {h.n}" if h.n else ""), "eps": eps, "norm": cfg.attack.norm,
           "attack": f"PGD-{h.pgd_steps}, step {h.pgd_step_fraction:g} eps, uniform start",
           "val_hist_local_lipschitz": "mean of ||f(x)-f(x')||_1 / ||x-x'||_inf at the PGD examples x' (estimate)",
           "val_hist_stable_acc": "fraction whose prediction at the PGD example equals the clean prediction"}
    if h.yang_lipschitz:
        out["val_hist_yang_lipschitz"] = f"Yang et al. 2020 metric, step rule {h.yang_variant!r} (estimate)"
    return out


def _batch_sums(cfg: TrainConfig, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, eps: float,
                gen: torch.Generator, seed: int) -> torch.Tensor:
    from experiments.attacks import pgd
    from experiments.evaluate import _paper_local_lipschitz

    h = cfg.history
    with torch.no_grad():
        clean = model(xb)
    xa = pgd(model, xb, yb, eps=eps, step_size=h.pgd_step_fraction * eps, steps=h.pgd_steps, norm=cfg.attack.norm,
             random_start="uniform", bn_mode="eval", generator=gen)
    with torch.no_grad():
        adv = model(xa)
    ratio = _paper_local_lipschitz(clean.cpu(), adv.cpu(), xb.cpu(), xa.cpu())
    finite = ~torch.isnan(ratio)
    sums = [float((clean.argmax(1) == yb).sum()), float((adv.argmax(1) == yb).sum()),
            float((adv.argmax(1) == clean.argmax(1)).sum()), float(ratio[finite].sum()), float(finite.sum()),
            float(yb.shape[0]), 0.0, 0.0]
    if h.yang_lipschitz:
        from lipschitz.lower import local_lipschitz_metric

        res = local_lipschitz_metric(model, xb, eps, variant=h.yang_variant, batch_size=xb.shape[0], seed=seed)
        sums[6], sums[7] = sum(res.per_sample), res.stable_accuracy * xb.shape[0]
    return torch.tensor(sums, dtype=torch.float64)


def robustness_history(cfg: TrainConfig, model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                       ctx: D.DistContext, epoch: int) -> dict[str, float]:
    """The history row entries (``val_hist_*``) for ``model`` on the validation split, all ranks together."""
    h = cfg.history
    n = x.shape[0] if h.n is None else min(h.n, x.shape[0])
    lo, hi = D.shard_bounds(n, ctx.rank, ctx.world_size)
    eps, _ = effective_attack_numbers(cfg.attack)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.run.seed * 7919 + epoch * 31 + ctx.rank + 4242)
    sums = torch.zeros(8, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for i in range(lo, hi, h.batch_size):
        xb, yb = x[i:min(i + h.batch_size, hi)].to(device), y[i:min(i + h.batch_size, hi)].to(device)
        sums += _batch_sums(cfg, model, xb, yb, eps, gen, cfg.run.seed + epoch + i)
    model.train(was_training)
    sums = D.all_reduce_sum(sums, ctx)
    total = max(sums[5].item(), 1.0)
    row = {"val_hist_clean_acc": sums[0].item() / total, "val_hist_pgd_acc": sums[1].item() / total,
           "val_hist_stable_acc": sums[2].item() / total,
           "val_hist_local_lipschitz": sums[3].item() / sums[4].item() if sums[4].item() else None}
    if h.yang_lipschitz:
        row["val_hist_yang_lipschitz"] = sums[6].item() / total
        row["val_hist_yang_stable_acc"] = sums[7].item() / total
    return row
