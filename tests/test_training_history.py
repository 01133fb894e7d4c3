"""Per-epoch robustness history: closed-form ground truth on a linear model, and its rows in a real run."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from experiments.cli import main
from experiments.config import load_config
from experiments.training import train
from experiments.training.distributed import DistContext
from experiments.training.history import history_due, robustness_history


def _linear_two_class(w: torch.Tensor, b: float) -> nn.Module:
    lin = nn.Linear(w.numel(), 2)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([w, -w]))
        lin.bias.copy_(torch.tensor([b, -b]))
    return nn.Sequential(nn.Flatten(), lin).eval()


def test_history_on_a_linear_model_equals_the_closed_form():
    """f(x) = [w.x + b, -(w.x + b)]: every PGD sign step moves each pixel by the same signed amount against the
    true class, so after PGD-20 with step eps/10 (total 2 eps) x' = x -/+ eps sign(w) exactly (pixels kept
    inside [eps, 1 - eps]). Hence ||f(x) - f(x')||_1 / ||x - x'||_inf = 2 ||w||_1, and the adversarial logit
    margin is known in closed form."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, generator=g)
    w[w.abs() < 0.1] = 0.3  # no zero entries
    model, eps = _linear_two_class(w, b=0.1), 0.15
    x = 0.2 + 0.6 * torch.rand(40, 1, 3, 4, generator=g)  # inside [eps, 1 - eps]
    y = torch.randint(0, 2, (40,), generator=g)
    cfg = load_config(None, ["history.enabled=true", "data.val_size=40", f"attack.eps={eps}", "history.batch_size=16"])
    row = robustness_history(cfg, model, x, y, torch.device("cpu"), DistContext(), epoch=0)
    z = x.flatten(1) @ w + 0.1
    toward_other = torch.where(y == 0, -1.0, 1.0)  # class 0 wants z > 0: the attack lowers z
    z_adv = z + toward_other * eps * w.abs().sum()
    pred, pred_adv = (z < 0).long(), (z_adv < 0).long()
    assert row["val_hist_local_lipschitz"] == pytest.approx(2 * w.abs().sum().item(), rel=1e-5)
    assert row["val_hist_clean_acc"] == pytest.approx((pred == y).float().mean().item())
    assert row["val_hist_pgd_acc"] == pytest.approx((pred_adv == y).float().mean().item())
    assert row["val_hist_stable_acc"] == pytest.approx((pred_adv == pred).float().mean().item())
    assert 0 < row["val_hist_pgd_acc"] < row["val_hist_clean_acc"]  # the case is not degenerate


def test_history_schedule():
    cfg = load_config(None, ["history.enabled=true", "data.val_size=10", "history.start_epoch=4", "history.every=3",
                             "run.epochs=10"])
    assert [e for e in range(10) if history_due(cfg, e)] == [4, 7, 9]
    assert not any(history_due(load_config(None, ["run.epochs=3"]), e) for e in range(3))


def test_a_run_logs_the_history_in_metrics_jsonl(tmp_path):
    cfg = load_config("digits-pgdat-tiny", ["run.epochs=2", "run.progress=false", "data.train_limit=256",
                                            "model.overrides.widths=[4,8,8,8]", "attack.steps=2",
                                            "history.enabled=true", "history.pgd_steps=3", "history.yang_lipschitz=true",
                                            "history.yang_variant=step-0.003", "selection.metric=clean_acc"])
    summary = train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for key in ("val_hist_clean_acc", "val_hist_pgd_acc", "val_hist_stable_acc", "val_hist_local_lipschitz",
                    "val_hist_yang_lipschitz", "val_hist_yang_stable_acc"):
            assert row[key] is not None and row[key] >= 0, key
        assert row["val_hist_clean_acc"] == pytest.approx(row["val_clean_acc"])  # same split, same weights
        assert row["val_hist_pgd_acc"] <= row["val_hist_clean_acc"] + 1e-12
    assert "step-0.003" in summary["history"]["val_hist_yang_lipschitz"] and "PGD-3" in summary["history"]["attack"]
    # archlip report on the run folder plots the history
    code = main(["report", str(tmp_path), "--out", str(tmp_path / "report")])
    assert code == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "![training_history](training_history.png)" in text and "val_hist_local_lipschitz" in text
    assert (tmp_path / "report" / "training_history.png").stat().st_size > 5000
