"""Training objectives for standard and adversarial training, as published (pure functions of logits).

All outer losses return a scalar averaged over the batch; the inner (attack) losses are summed over the
batch because only their gradient direction per example matters (sign / normalised steps).

References: Madry et al. 2018 (PGD-AT); Zhang et al. 2019 (TRADES, github.com/yaodongyu/TRADES);
Wang et al. 2020 (MART, github.com/YisenWang/MART); Wong et al. 2020 (FGSM with random start).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# numerical guards exactly as in the MART reference implementation
MART_LOG_EPS = 1e-12
MART_ONE_PLUS = 1.0001
MART_WEIGHT_ONE = 1.0000001


def _check_logits(logits: torch.Tensor, y: torch.Tensor | None = None) -> None:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (N, C) with C >= 2, got shape {tuple(logits.shape)}")
    if y is not None and (y.dim() != 1 or y.shape[0] != logits.shape[0]):
        raise ValueError(f"labels must be (N,) matching logits {tuple(logits.shape)}, got {tuple(y.shape)}")


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy, optionally with label smoothing (Szegedy et al. 2016)."""
    _check_logits(logits, y)
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)


def kl_clean_to_adv(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """Per-example ``KL(p_clean || p_adv)`` = ``sum_k p_clean,k (log p_clean,k - log p_adv,k)``.

    Computed like TRADES' ``nn.KLDivLoss(log_softmax(adv), softmax(clean))`` (target = clean probabilities).
    """
    _check_logits(logits_clean)
    _check_logits(logits_adv)
    log_p_adv = F.log_softmax(logits_adv.float(), dim=1)
    p_clean = F.softmax(logits_clean.float(), dim=1)
    return F.kl_div(log_p_adv, p_clean, reduction="none").sum(dim=1)


def trades_inner_loss(logits_adv: torch.Tensor, p_clean: torch.Tensor) -> torch.Tensor:
    """TRADES attack objective: ``sum_i KL(p_clean_i || p_adv_i)`` (``KLDivLoss(size_average=False)``)."""
    return F.kl_div(F.log_softmax(logits_adv.float(), dim=1), p_clean, reduction="sum")


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float,
                label_smoothing: float = 0.0) -> torch.Tensor:
    """TRADES: ``CE(f(x), y) + beta * (1/N) sum_i KL(p(x_i) || p(x'_i))``.

    References: Zhang et al. 2019, "Theoretically Principled Trade-off between Robustness and Accuracy".
    """
    natural = cross_entropy(logits_clean, y, label_smoothing)
    robust = kl_clean_to_adv(logits_clean, logits_adv).sum() / logits_clean.shape[0]
    return natural + beta * robust


def mart_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """MART: boosted CE on x' plus ``beta * mean_i KL(p(x_i) || p(x'_i)) * (1 - p_y(x_i))``.

    Boosted CE = ``CE(f(x'), y) - mean_i log(1.0001 - max_{k != y} p_k(x'_i) + 1e-12)``; the second-best
    class is taken from ``argsort`` of the adversarial probabilities as in the reference code.
    References: Wang et al. 2020, "Improving Adversarial Robustness Requires Revisiting Misclassified Examples".
    """
    _check_logits(logits_clean, y)
    _check_logits(logits_adv, y)
    n = logits_clean.shape[0]
    adv_probs = F.softmax(logits_adv.float(), dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    runner_up = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    boosted_ce = F.cross_entropy(logits_adv.float(), y) + F.nll_loss(
        torch.log(MART_ONE_PLUS - adv_probs + MART_LOG_EPS), runner_up
    )
    nat_probs = F.softmax(logits_clean.float(), dim=1)
    true_probs = nat_probs.gather(1, y[:, None]).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + MART_LOG_EPS), nat_probs, reduction="none").sum(dim=1)
    robust = (kl * (MART_WEIGHT_ONE - true_probs)).sum() / n
    return boosted_ce + float(beta) * robust
