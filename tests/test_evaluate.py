"""experiments.evaluate: monotonicity, AutoAttack parity with pyautoattack, guards, outputs, resume."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import experiments.attacks as attacks_mod
from experiments.attacks import BallViolationError, get_attack_preset
from experiments.evaluate import LogitsError, build_autoattack, evaluate, select_points

AA_CUSTOM = "aa-custom:apgd-ce+apgd-t"


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64)


@pytest.fixture(scope="module")
def digits_setup():
    """A small MLP trained for a second on scikit-learn's digits, plus held-out points."""
    x, y = _digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(x.shape[0], generator=g)
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        opt.zero_grad()
        F.cross_entropy(model(x[train]), y[train]).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, x[test], y[test]


@pytest.fixture(scope="module")
def aa_run(digits_setup, tmp_path_factory):
    model, x, y = digits_setup
    out = tmp_path_factory.mktemp("aa_run")
    summary = evaluate(model, x, y, ["pgd20", "cw20", AA_CUSTOM], eps=0.1, n=30, seed=0, out_dir=out,
                       progress=False)
    return summary, out


def _per_example(out) -> list[dict]:
    return [json.loads(line) for line in (out / "per_example.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------------------
# numbers


def test_robust_accuracy_non_increasing_in_eps(digits_setup):
    model, x, y = digits_setup
    accs = []
    for eps in (0.0, 0.05, 0.1, 0.2, 0.4):
        s = evaluate(model, x, y, ["pgd20", "fgsm"], eps=eps, n=60, progress=False)
        accs.append(s["worst_case"]["robust_accuracy"])
        assert s["robust_accuracy"]["pgd20"] <= s["robust_accuracy"]["fgsm"] + 1e-9  # PGD-20 >= its first step
        if eps == 0.0:
            assert s["robust_accuracy"]["pgd20"] == s["clean_accuracy"]
    assert all(b <= a for a, b in zip(accs, accs[1:])), accs
    assert accs[0] > 0.8 and accs[-1] < 0.2  # the model is accurate, and large eps breaks it


def test_worst_case_over_pgd_cw_autoattack(aa_run):
    summary, out = aa_run
    accs = summary["robust_accuracy"]
    assert set(accs) == {"pgd20", "cw20", AA_CUSTOM}
    worst = summary["worst_case"]["robust_accuracy"]
    assert worst <= min(accs.values()) + 1e-9 and summary["worst_case"]["min_over_attacks"] == min(accs.values())
    assert accs[AA_CUSTOM] <= accs["pgd20"] + 1e-9  # APGD-CE (100 its) + APGD-T is at least as strong as PGD-20
    rows = _per_example(out)
    assert len(rows) == 30 == summary["n"]
    assert [r["index"] for r in rows] == list(range(30))
    for r in rows:  # per-example AND over the attacks run, and over clean correctness
        assert r["robust_worst_case"] == (r["clean_correct"] and all(r["robust"].values()))
        for name, robust in r["robust"].items():
            margin = r["margin"][name]
            assert margin is not None and (margin > 0) == robust or not r["clean_correct"]
    assert math.isclose(worst, sum(r["robust_worst_case"] for r in rows) / 30)
    assert math.isclose(summary["clean_accuracy"], sum(r["clean_correct"] for r in rows) / 30)


def test_autoattack_through_toolkit_equals_pyautoattack_direct(digits_setup, aa_run):
    from pyautoattack import AutoAttack

    model, x, y = digits_setup
    summary, out = aa_run
    xs, ys = x[:30], y[:30]
    adversary = AutoAttack(model, norm="Linf", eps=0.1, seed=0, version="custom", attacks=["apgd-ce", "apgd-t"])
    x_adv, _ = adversary.run_standard_evaluation(xs, ys, batch_size=250)
    with torch.no_grad():
        robust_direct = (model(x_adv).argmax(1) == ys) & (model(xs).argmax(1) == ys)
    robust_toolkit = torch.tensor([r["robust"][AA_CUSTOM] for r in _per_example(out)])
    assert torch.equal(robust_direct, robust_toolkit)
    assert summary["robust_accuracy"][AA_CUSTOM] == pytest.approx(robust_direct.double().mean().item(), abs=0)
    settings = summary["attacks"][AA_CUSTOM]["settings"]
    assert settings["seed"] == 0 and settings["attacks"] == ["apgd-ce", "apgd-t"] and settings["version"] == "custom"
    assert summary["attacks"][AA_CUSTOM]["cumulative_robust_accuracy"]["apgd-t"] == pytest.approx(
        robust_direct.double().mean().item(), abs=1e-4)


@pytest.mark.slow
def test_autoattack_standard_equals_pyautoattack_direct(digits_setup):
    from pyautoattack import AutoAttack

    model, x, y = digits_setup
    xs, ys = x[:12], y[:12]
    summary = evaluate(model, xs, ys, ["aa"], eps=0.15, seed=3, progress=False)
    adversary = AutoAttack(model, norm="Linf", eps=0.15, seed=3, version="standard")
    x_adv, _ = adversary.run_standard_evaluation(xs, ys, batch_size=250)
    with torch.no_grad():
        direct = ((model(x_adv).argmax(1) == ys) & (model(xs).argmax(1) == ys)).double().mean().item()
    assert summary["robust_accuracy"]["aa"] == pytest.approx(direct, abs=0)
    assert summary["attacks"]["aa"]["settings"]["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]


def test_stable_accuracy_and_local_lipschitz_closed_form():
    """Binary linear model, FGSM from x: delta = eps*sign(w_j - w_y), so ||f(x)-f(x')||_1/||delta||_inf is
    sum_k |w_k . sign(w_j - w_y)| exactly."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 2)
    model = nn.Sequential(nn.Flatten(), lin)
    x = 0.3 + 0.4 * torch.rand(10, 1, 4, 4)
    y = torch.randint(0, 2, (10,))
    eps = 0.05
    s = evaluate(model, x, y, ["fgsm"], eps=eps, progress=False)
    w = lin.weight.detach()
    sign = torch.where(y == 0, 1.0, -1.0)[:, None] * (w[1] - w[0]).sign()[None, :]
    expected = (sign @ w.T).abs().sum(dim=1).mean().item()
    lip = s["attacks"]["fgsm"]["local_lipschitz_at_attack"]
    assert lip["value"] == pytest.approx(expected, rel=1e-5) and lip["guarantee"] == "estimate"
    with torch.no_grad():
        pred_clean = model(x).argmax(1)
        pred_adv = model(x + eps * sign.view(10, 1, 4, 4)).argmax(1)
    assert s["attacks"]["fgsm"]["stable_accuracy"] == pytest.approx((pred_adv == pred_clean).double().mean().item())


# --------------------------------------------------------------------------------------------------------
# guards and checks


def test_guard_trips_on_planted_out_of_ball_example(digits_setup, monkeypatch):
    model, x, y = digits_setup
    real_pgd = attacks_mod.pgd

    def leaky_pgd(*args, **kwargs):
        x_adv = real_pgd(*args, **kwargs).clone()
        x_adv[3] = 1.0 - args[1][3]  # one example planted far outside its eps-ball (still in [0, 1])
        return x_adv

    monkeypatch.setattr(attacks_mod, "pgd", leaky_pgd)
    with pytest.raises(BallViolationError, match="examples \\[3\\]"):
        evaluate(model, x, y, ["pgd10"], eps=0.1, n=8, progress=False)


def test_guard_trips_on_planted_autoattack_example(digits_setup, monkeypatch):
    from pyautoattack import AutoAttack

    model, x, y = digits_setup

    def bad_run(self, x_orig, y_orig, /, *, batch_size=250, state_path=None):
        x_adv = x_orig.clone()
        x_adv[1] = 1.0 - x_adv[1]
        return x_adv, y_orig

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", bad_run)
    with pytest.raises(BallViolationError, match="outside the linf ball"):
        evaluate(model, x, y, [AA_CUSTOM], eps=0.1, n=4, progress=False)


class _Const(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.lin = nn.Linear(64, 10)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.lin(x.flatten(1)))


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda z: F.softmax(z, dim=1), "probabilities"),
        (lambda z: z * float("nan"), "NaN"),
        (lambda z: z[:, :, None], "shape"),
        (lambda z: z.argmax(1, keepdim=True).repeat(1, 3), "floating|shape"),
    ],
)
def test_bad_model_outputs_rejected(fn, match):
    x, y = _digits()
    with pytest.raises(LogitsError, match=match):
        evaluate(_Const(fn), x[:8], y[:8], ["fgsm"], eps=0.1, progress=False)


def test_bad_inputs_rejected(digits_setup):
    model, x, y = digits_setup
    with pytest.raises(TypeError):
        evaluate(model, x, y, ["pgd20"])  # eps is required: no default
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate(model, x * 255, y, ["fgsm"], eps=0.1, n=4, progress=False)
    with pytest.raises(ValueError, match="valid: aa, aa-plus"):
        evaluate(model, x, y, ["pgd7"], eps=0.1, n=4, progress=False)
    with pytest.raises(ValueError, match="norm='l2'"):
        evaluate(model, x, y, ["pgd-l2"], eps=0.1, n=4, progress=False)
    with pytest.raises(ValueError, match="n must be"):
        evaluate(model, x, y, ["fgsm"], eps=0.1, n=10_000, progress=False)
    with pytest.raises(ValueError, match="first, random"):
        evaluate(model, x, y, ["fgsm"], eps=0.1, n=4, points="last", progress=False)
    with pytest.raises(TypeError, match="dtype"):
        evaluate(model, x.double(), y, ["fgsm"], eps=0.1, n=4, progress=False)


def test_fewer_than_ten_classes_warns_with_docs_pointer():
    x, y = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).eval()
    xs, ys = x[y < 5][:4], y[y < 5][:4]
    with pytest.warns(UserWarning, match="docs/evaluation.md"):  # tiny eps: points survive every target
        s = evaluate(model, xs, ys, ["aa-custom:apgd-t"], eps=1e-4, progress=False)
    settings = s["attacks"]["aa-custom:apgd-t"]["settings"]
    assert settings["apgd_targeted_n_target_classes"] == 4 and "non_standard" in settings
    with pytest.raises(ValueError, match="not an AutoAttack preset"):
        build_autoattack(model, get_attack_preset("pgd20"), eps=0.1, norm="linf", seed=0, n_classes=5)


def test_model_is_evaluated_in_eval_mode_and_modes_restored(digits_setup):
    model, x, y = digits_setup
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Dropout(0.5), nn.ReLU(),
                        nn.Linear(32, 10))
    a = evaluate(net.eval(), x, y, ["fgsm"], eps=0.05, n=20, progress=False)
    net.train()
    b = evaluate(net, x, y, ["fgsm"], eps=0.05, n=20, progress=False)
    assert net.training and all(m.training for m in net.modules())
    assert a["robust_accuracy"] == b["robust_accuracy"] and a["clean_accuracy"] == b["clean_accuracy"]
    assert torch.equal(net[2].running_mean, torch.zeros(32))  # no batch statistics were used or updated


# --------------------------------------------------------------------------------------------------------
# points, outputs, resume


def test_points_first_or_seeded_subset(digits_setup, tmp_path):
    model, x, y = digits_setup
    assert torch.equal(select_points(100, 5), torch.arange(5))
    r1, r2 = select_points(100, 5, "random", seed=1), select_points(100, 5, "random", seed=1)
    assert torch.equal(r1, r2) and not torch.equal(r1, torch.arange(5)) and len(set(r1.tolist())) == 5
    s = evaluate(model, x, y, ["fgsm"], eps=0.05, n=7, points="random", seed=1, out_dir=tmp_path, progress=False)
    assert s["points"]["selection"] == "random" and s["points"]["seed"] == 1 and "seed 1" in s["points"]["description"]
    rows = _per_example(tmp_path)
    assert [r["index"] for r in rows] == select_points(x.shape[0], 7, "random", seed=1).tolist()
    assert [r["label"] for r in rows] == y[select_points(x.shape[0], 7, "random", seed=1)].tolist()
    on_disk = json.loads((tmp_path / "eval_summary.json").read_text())
    assert on_disk["n"] == 7 and on_disk["eps"] == 0.05 and on_disk["norm"] == "linf"
    assert {"torch", "archlip", "pyautoattack"} <= set(on_disk["versions"])


def test_summary_fields_for_pgd_runs(aa_run):
    summary, _ = aa_run
    for name in ("pgd20", "cw20"):
        info = summary["attacks"][name]
        assert 0.0 <= info["stable_accuracy"] <= 1.0
        assert info["local_lipschitz_at_attack"]["value"] > 0
        assert info["step_size"] == pytest.approx(0.1 * 0.1)
    files = summary["attacks"][AA_CUSTOM]["state_files"]
    assert set(files) == {"apgd-ce", "apgd-t"} and all(f.endswith(".state.json") for f in files.values())
    assert summary["attacks"][AA_CUSTOM]["examples_checked"] == round(
        30 * (summary["clean_accuracy"] - summary["robust_accuracy"][AA_CUSTOM]))
    assert summary["points"]["selection"] == "first" and summary["points"]["description"] == "first 30 points in order"


class _Interruptible(nn.Module):
    """Wraps a model; raises after ``fuse`` forward calls when armed (not part of the state dict)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.fuse: int | None = None
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.fuse is not None and self.calls > self.fuse:
            raise KeyboardInterrupt("simulated interruption")
        return self.net(x)


def test_resume_gradient_attacks_matches_uninterrupted_run(digits_setup, tmp_path):
    model, x, y = digits_setup
    wrapped = _Interruptible(model)

    def uncount_timing(_estimate):  # called after the clean pass (4 batches) and the estimate's timing calls
        wrapped.calls = 4

    kw = dict(eps=0.1, n=40, batch_size=10, progress=False, lipschitz_metric=False, on_estimate=uncount_timing)
    full = evaluate(wrapped, x, y, ["fgsm", "pgd10"], out_dir=tmp_path / "full", **kw)
    full_calls = wrapped.calls
    wrapped.calls, wrapped.fuse = 0, 4 + 4 * 2 + 2 * 11 + 5  # clean, fgsm, 2 batches of pgd10, then stop
    with pytest.raises(KeyboardInterrupt):
        evaluate(wrapped, x, y, ["fgsm", "pgd10"], out_dir=tmp_path / "cut", **kw)
    state = json.loads((tmp_path / "cut" / "eval_state.json").read_text())
    assert state["attacks"]["fgsm"]["done"] and state["attacks"]["pgd10"]["done_batches"] == 2
    wrapped.calls, wrapped.fuse = 0, None
    resumed = evaluate(wrapped, x, y, ["fgsm", "pgd10"], out_dir=tmp_path / "cut", **kw)
    assert wrapped.calls == 4 + 2 * 11  # clean pass + the 2 remaining pgd10 batches only
    assert wrapped.calls < full_calls
    assert resumed["robust_accuracy"] == full["robust_accuracy"]
    assert _per_example(tmp_path / "cut") == _per_example(tmp_path / "full")
    with pytest.raises(ValueError, match="differs in: eps"):
        evaluate(wrapped, x, y, ["fgsm", "pgd10"], out_dir=tmp_path / "cut", **{**kw, "eps": 0.2})
    with pytest.raises(FileExistsError, match="resume=True"):
        evaluate(wrapped, x, y, ["fgsm", "pgd10"], out_dir=tmp_path / "cut", resume=False, **kw)


def test_resume_autoattack_from_its_state_file(digits_setup, tmp_path, monkeypatch):
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    model, x, y = digits_setup
    kw = dict(eps=0.1, n=20, progress=False)
    full = evaluate(model, x, y, [AA_CUSTOM], out_dir=tmp_path / "full", **kw)

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt("simulated interruption during apgd-t")

    with monkeypatch.context() as mp:
        mp.setattr(APGDAttack_targeted, "perturb", interrupted)
        with pytest.raises(KeyboardInterrupt):
            evaluate(model, x, y, [AA_CUSTOM], out_dir=tmp_path / "cut", **kw)
    state = json.loads((tmp_path / "cut" / "eval_state.json").read_text())
    assert state["attacks"][AA_CUSTOM]["completed"] == ["apgd-ce"] and not state["attacks"][AA_CUSTOM].get("done")
    assert (tmp_path / "cut" / "autoattack-aa-custom_apgd-ce_apgd-t-apgd-t.state.json").exists()
    calls = []
    real = APGDAttack.perturb
    monkeypatch.setattr(APGDAttack, "perturb", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    resumed = evaluate(model, x, y, [AA_CUSTOM], out_dir=tmp_path / "cut", **kw)
    assert calls == []  # apgd-ce is not run again
    assert resumed["robust_accuracy"] == full["robust_accuracy"]
    assert resumed["attacks"][AA_CUSTOM]["examples_checked"] == full["attacks"][AA_CUSTOM]["examples_checked"] > 0
    assert _per_example(tmp_path / "cut") == _per_example(tmp_path / "full")


def test_resume_inside_an_autoattack_attack_from_per_batch_flags(digits_setup, tmp_path, monkeypatch):
    from pyautoattack.autopgd_base import APGDAttack_targeted

    model, x, y = digits_setup
    kw = dict(eps=0.1, n=14, batch_size=3, progress=False, lipschitz_metric=False)
    evaluate(model, x, y, [AA_CUSTOM], out_dir=tmp_path / "full", **kw)  # the uninterrupted reference run
    real = APGDAttack_targeted.perturb
    calls = []

    def second_batch_fails(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption in apgd-t batch 2")
        return real(self, *a, **k)

    with monkeypatch.context() as mp:
        mp.setattr(APGDAttack_targeted, "perturb", second_batch_fails)
        with pytest.raises(KeyboardInterrupt):
            evaluate(model, x, y, [AA_CUSTOM], out_dir=tmp_path / "cut", **kw)
    upstream = json.loads((tmp_path / "cut" / "autoattack-aa-custom_apgd-ce_apgd-t-apgd-t.state.json").read_text())
    broken_in_batch_1 = 3 - sum(upstream["_robust_flags"][:3])
    resumed = evaluate(model, x, y, [AA_CUSTOM], out_dir=tmp_path / "cut", **kw)
    info = resumed["attacks"][AA_CUSTOM]
    assert info["unverified_after_interruption"] == broken_in_batch_1
    rows_full, rows_cut = _per_example(tmp_path / "full"), _per_example(tmp_path / "cut")
    assert sum(r["margin"][AA_CUSTOM] is None for r in rows_cut) == broken_in_batch_1
    # batch 1's verdicts are kept; the robust set only shrinks, and matches the uninterrupted run here
    assert resumed["robust_accuracy"][AA_CUSTOM] <= info["cumulative_robust_accuracy"]["apgd-ce"]
    assert [r["robust"] for r in rows_cut] == [r["robust"] for r in rows_full]


def test_lipschitz_metric_hook(digits_setup):
    model, x, y = digits_setup
    s = evaluate(model, x, y, ["fgsm"], eps=0.05, n=8, progress=False, lipschitz_metric=True)
    lip = s["local_lipschitz_metric"]
    assert lip["available"], lip
    assert lip["value"]["guarantee"] == "estimate" and math.isfinite(lip["value"]["value"])
    assert s["attacks"]["fgsm"]["local_lipschitz_yang2020"] == lip["value"]["value"]
    assert 0.0 <= lip["stable_accuracy"] <= 1.0


def test_wrn_tiny_end_to_end(tmp_path):
    """The toolkit's own tiny WideResNet (batch norm, residuals) through PGD, CW and AutoAttack."""
    import experiments.models as models
    x, y = _digits()
    torch.manual_seed(0)
    model = models.create_model("wrn-tiny", in_channels=1)
    model.train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    s = evaluate(model, x, y, ["pgd10", "cw20", "aa-custom:apgd-ce"], eps=0.1, n=12, out_dir=tmp_path,
                 progress=False, lipschitz_metric=False)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    assert s["worst_case"]["robust_accuracy"] <= min(s["robust_accuracy"].values()) <= s["clean_accuracy"]
    assert len(_per_example(tmp_path)) == 12


class _NoisyNet(nn.Module):
    """A randomised defence: Gaussian input noise at every forward, also in eval mode."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x + 0.05 * torch.randn_like(x))


def test_autoattack_rand_version_on_a_randomised_model(digits_setup):
    model, x, y = digits_setup
    cheap = get_attack_preset("aa-rand").with_overrides(
        name="aa-rand-cheap", extra={"autoattack_overrides": {"apgd": {"n_iter": 5, "eot_iter": 4}}})
    s = evaluate(_NoisyNet(model), x, y, [cheap], eps=0.1, n=8, progress=False, lipschitz_metric=False)
    info = s["attacks"]["aa-rand-cheap"]
    assert info["settings"]["version"] == "rand" and info["settings"]["attacks"] == ["apgd-ce", "apgd-dlr"]
    assert "non_standard" in info["settings"]
    assert 0.0 <= s["robust_accuracy"]["aa-rand-cheap"] <= s["clean_accuracy"]
