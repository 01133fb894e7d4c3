"""experiments.autoattack_engine: the exact loops reproduce pyautoattack's flags and iterates, with fewer model calls."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experiments import autoattack_engine as E
from experiments.attacks import get_attack_preset
from experiments.eval_estimate import PlannedAttack, UnitCosts, estimate_duration
from experiments.evaluate import build_autoattack, evaluate

pytest.importorskip("pyautoattack")


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(d.target, dtype=torch.int64)


class _SmallCNN(nn.Module):
    """Conv + BN + ReLU + linear: oneDNN kernels whose input gradients change below some batch size on CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.conv2(x)).flatten(1))


@pytest.fixture(scope="module")
def models():
    """An MLP and a small CNN trained briefly on digits (so all attacks have robust and broken points)."""
    x, y = _digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(x.shape[0], generator=g)
    out = {}
    for name, net in (("mlp", nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))),
                      ("cnn", _SmallCNN())):
        torch.manual_seed(0)
        net = net if name == "mlp" else _SmallCNN()
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(30):
            opt.zero_grad()
            F.cross_entropy(net(x[perm[:600]]), y[perm[:600]]).backward()
            opt.step()
        out[name] = net.eval()
    return out, x[perm[1400:]], y[perm[1400:]]


def _cheap(attacks: str, **overrides):
    """An AutoAttack custom preset with fewer iterations (the loops are the same; tests stay fast)."""
    settings = {"apgd": {"n_iter": 10}, "apgd_targeted": {"n_iter": 10, "n_target_classes": 2},
                "fab": {"n_iter": 10, "n_target_classes": 2}, "square": {"n_queries": 200}, **overrides}
    return get_attack_preset(f"aa-custom:{attacks}").with_overrides(
        name=f"cheap:{attacks}", extra={"autoattack_overrides": settings})


def _adversaries(model, x_probe, eps=0.08, **settings):
    from pyautoattack import AutoAttack

    up = AutoAttack(model, norm="Linf", eps=eps, seed=0, version="standard")
    ex = AutoAttack(model, norm="Linf", eps=eps, seed=0, version="standard")
    info = E.accelerate(ex, model, x_probe)
    for adv in (up, ex):
        for component, attrs in settings.items():
            for k, v in attrs.items():
                setattr(getattr(adv, component), k, v)
    return up, ex, info


def test_batch_invariance_probe(models):
    nets, x, _ = models
    inv = E.batch_invariance(nets["cnn"], x[:64])
    assert inv.forward in E.PAD_CANDIDATES and inv.backward in E.PAD_CANDIDATES and inv.points == 64

    class Mixing(nn.Module):  # each point's output depends on the batch mean
        def forward(self, z):
            return nets["mlp"](z - z.mean(0, keepdim=True))

    bad = E.batch_invariance(Mixing(), x[:64])
    assert bad.forward is None and "changes with the batch" in bad.reason
    assert E.batch_invariance(nets["mlp"], x[:5]).reason.startswith("too few points")


@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("attack", ["apgd-ce", "apgd-t", "fab-t"])
def test_gradient_attacks_keep_upstream_iterates_of_robust_points(models, net, attack):
    """Same batch, same seed: identical flags; a point that stays robust gets bitwise the same result."""
    nets, x, y = models
    model, xb, yb = nets[net], x[:40], y[:40]
    up, ex, info = _adversaries(model, x[:64], apgd={"n_iter": 25}, apgd_targeted={"n_iter": 25,
                                "n_target_classes": 3}, fab={"n_iter": 25, "n_target_classes": 3})
    assert info.engine == "exact", info.reason
    outs = []
    for adv in (up, ex):
        adv.attacks_to_run = [attack]
        with E.frozen_parameters(model) if adv is ex else torch.no_grad():
            outs.append(adv.run_standard_evaluation(xb, yb, batch_size=32)[0])
    with torch.no_grad():
        flags = [model(o).argmax(1) == yb for o in outs]
    assert torch.equal(flags[0], flags[1])
    robust = flags[0]
    assert robust.any() and (~robust).any()
    assert torch.equal(outs[0][robust], outs[1][robust])
    dist = (outs[1] - xb).flatten(1).abs().amax(1)
    assert bool((dist <= 0.08 + 1e-6).all())
    stats = E.engine_stats(ex)
    assert sum(s["backward_rows"] for s in stats.values()) > 0


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_square_is_bitwise_upstream_with_far_fewer_model_rows(models, net):
    nets, x, y = models
    model = nets[net]
    up, ex, _ = _adversaries(model, x[:64], square={"n_queries": 400})
    results = []
    for adv in (up, ex):
        torch.manual_seed(0)
        adv.square.init_hyperparam(x[:40])
        adv.square.seed = 0
        torch.random.manual_seed(0)
        results.append(adv.square.attack_single_run(x[:40], y[:40]))
    assert torch.equal(results[0][0], results[1][0])  # queries per point
    assert torch.equal(results[0][1], results[1][1])  # best examples
    stats = ex.square.stats
    assert stats.reused_rows > stats.forward_rows  # most queries were known


def test_evaluate_exact_engine_equals_upstream_engine(models, tmp_path):
    nets, x, y = models
    cheap = get_attack_preset("aa").with_overrides(name="aa-cheap", extra={"autoattack_overrides": {
        "apgd": {"n_iter": 20}, "apgd_targeted": {"n_iter": 20, "n_target_classes": 3},
        "fab": {"n_iter": 20, "n_target_classes": 3}, "square": {"n_queries": 300}}})  # the standard list
    runs = {}
    for engine in ("upstream", "exact"):
        runs[engine] = evaluate(nets["cnn"], x, y, [cheap], eps=0.08, n=48, out_dir=tmp_path / engine, progress=False,
                                lipschitz_metric=False, aa_engine=engine)
    rows = {e: [json.loads(r)["robust"]["aa-cheap"] for r in (tmp_path / e / "per_example.jsonl").read_text().splitlines()]
            for e in runs}
    assert rows["exact"] == rows["upstream"]
    assert runs["exact"]["robust_accuracy"] == runs["upstream"]["robust_accuracy"]
    info = runs["exact"]["attacks"]["aa-cheap"]["settings"]["engine"]
    assert info["engine"] == "exact" and set(info["attacks"]) == {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert runs["upstream"]["attacks"]["aa-cheap"]["settings"]["engine"]["engine"] == "upstream"
    state = json.loads((tmp_path / "exact" / "eval_state.json").read_text())["attacks"]["aa-cheap"]
    assert set(state["attack_seconds"]) == {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert state["model_rows"]["square"]["reused_rows"] > 0
    assert runs["exact"]["estimate"]["guarantee"] == "estimate" and runs["exact"]["estimate"]["seconds"] > 0


def test_falls_back_to_upstream_loops_when_points_interact(models):
    nets, x, y = models

    class Mixing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nets["mlp"]

        def forward(self, z):
            return self.net(z - 0.01 * z.mean(0, keepdim=True))

    s = evaluate(Mixing(), x, y, [_cheap("apgd-ce")], eps=0.1, n=20, progress=False, lipschitz_metric=False)
    info = s["attacks"]["cheap:apgd-ce"]["settings"]["engine"]
    assert info["engine"] == "upstream" and "not batch-invariant" in info["reason"]


def test_parameters_frozen_only_during_the_attack_and_no_weight_gradients(models):
    nets, x, y = models
    model = nets["cnn"]
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    evaluate(model, x, y, [_cheap("fab-t")], eps=0.1, n=12, progress=False, lipschitz_metric=False,
             aa_engine="exact")
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    evaluate(model, x, y, [_cheap("fab-t")], eps=0.1, n=12, progress=False, lipschitz_metric=False,
             aa_engine="upstream")
    assert any(p.grad is not None for p in model.parameters())  # upstream FAB's .backward() fills them
    for p in model.parameters():
        p.grad = None
    with pytest.raises(ValueError, match="aa_engine"):
        evaluate(model, x, y, ["aa"], eps=0.1, n=4, progress=False, aa_engine="fast")


def test_work_model_and_estimate(models):
    nets, _, _ = models
    assert E.square_forwards((1, 8, 8), 5000, 0.8, exact=False) == 5000
    assert 300 < E.square_forwards((1, 8, 8), 5000, 0.8, exact=True) < 1000  # 8x8 grey: few distinct queries
    assert E.square_forwards((3, 32, 32), 5000, 0.8, exact=True) > 4000  # CIFAR: queries rarely repeat
    adversary, _ = build_autoattack(nets["mlp"], get_attack_preset("aa"), eps=0.1, norm="linf", seed=0, n_classes=10)
    work = {a: E.attack_work(adversary, a, 10, (1, 8, 8), True) for a in adversary.attacks_to_run}
    assert work["apgd-ce"].iterations == 100 and work["apgd-t"].iterations == 900
    assert work["fab-t"].forward_backward == 900 and work["square"].iterations == 5000
    costs = UnitCosts(1e-3, 1e-4, 2e-3, 3e-4, (2, 64))
    plan = [PlannedAttack(f"aa {a}", w, "correct", 250) for a, w in work.items()]
    est = estimate_duration(costs, plan, 2000, 0.9, "cpu")
    assert est.seconds == pytest.approx(sum(est.per_attack.values()))
    assert est.seconds_for(100) < est.seconds_for(1000) < est.seconds
    n = est.suggestion()
    assert n is not None and est.seconds_for(n) <= 300
    text = est.describe(n_flag="--n")
    assert text.startswith("estimated ~") and "on cpu for 2000 points" in text and f"--n {n}:" in text


def test_progress_shows_estimate_and_a_bar_per_attack(models, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # a bar narrower than its text shortens the text; not what is tested here
    nets, x, y = models
    evaluate(nets["mlp"], x, y, [_cheap("apgd-ce+square")], eps=0.1, n=16, progress=True, lipschitz_metric=False)
    err = capsys.readouterr().err
    assert "estimated ~" in err and "for 16 points" in err
    assert "apgd-ce" in err and "square" in err and "still robust" in err
