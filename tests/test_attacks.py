"""experiments.attacks: geometry guards, exact optima on linear models, mode/grad hygiene, presets."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from experiments.attacks import (
    BallViolationError,
    check_in_ball,
    cw_inf,
    cw_loss,
    fgsm,
    gama_pgd,
    get_attack_preset,
    list_attack_presets,
    logit_margin,
    pgd,
    project,
)


def _small_net(in_features: int = 16, classes: int = 4, bn: bool = True) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(in_features, 12)]
    if bn:
        layers.append(nn.BatchNorm1d(12))
    layers += [nn.ReLU(), nn.Linear(12, classes)]
    return nn.Sequential(*layers)


def _linear_binary(d: int = 16, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, d, generator=g))
        lin.bias.zero_()
    return lin


# --------------------------------------------------------------------------------------------------------
# geometry


@settings(max_examples=20, deadline=None)
@given(
    norm=st.sampled_from(["linf", "l2"]),
    start=st.sampled_from(["uniform", "normal", "none"]),
    eps=st.floats(0.0, 0.6),
    steps=st.integers(0, 4),
    restarts=st.integers(1, 2),
    seed=st.integers(0, 1000),
)
def test_pgd_stays_in_ball_and_box(norm, start, eps, steps, restarts, seed):
    g = torch.Generator().manual_seed(seed)
    model = _small_net()
    x = torch.rand(6, 1, 4, 4, generator=g)
    x[0] = 0.0  # corners of the box: clamping must keep the ball
    x[1] = 1.0
    y = torch.randint(0, 4, (6,), generator=g)
    x_adv = pgd(model, x, y, eps=eps, step_size=0.3, steps=steps, norm=norm, random_start=start,
                restarts=restarts, generator=g)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    dist = check_in_ball(x_adv, x, eps, norm, atol=1e-6)
    assert dist <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_random_start_uniform_fills_the_linf_ball():
    x = torch.full((200, 1, 4, 4), 0.5)
    y = torch.zeros(200, dtype=torch.int64)
    x_adv = pgd(_small_net(), x, y, eps=0.2, step_size=0.0, steps=0, generator=torch.Generator().manual_seed(1))
    delta = x_adv - x
    assert delta.abs().max() <= 0.2 + 1e-7
    assert delta.abs().max() > 0.19 and abs(delta.mean().item()) < 0.01  # spread over the ball, centred


def test_project_l2_and_linf():
    x = torch.full((1, 4), 0.5)
    far = torch.tensor([[0.5 + 3.0, 0.5 + 4.0, 0.5, 0.5]])  # delta (3, 4, 0, 0), norm 5
    p2 = project(far, x, 0.5, "l2")
    assert torch.allclose(p2 - x, torch.tensor([[0.3, 0.4, 0.0, 0.0]]), atol=1e-6)
    pinf = project(far, x, 0.25, "linf")
    assert torch.allclose(pinf - x, torch.tensor([[0.25, 0.25, 0.0, 0.0]]), atol=1e-6)


@pytest.mark.parametrize(
    "plant, message",
    [
        (lambda xa: xa.__setitem__((2, 0, 0, 0), xa[2, 0, 0, 0] + 0.2), "outside the linf ball"),
        (lambda xa: xa.__setitem__((1, 0, 1, 1), 1.05), "leaves [0, 1]"),
        (lambda xa: xa.__setitem__((0, 0, 0, 1), float("nan")), "NaN"),
    ],
)
def test_check_in_ball_trips_on_planted_bad_example(plant, message):
    g = torch.Generator().manual_seed(0)
    x = 0.25 + 0.5 * torch.rand(4, 1, 4, 4, generator=g)
    y = torch.randint(0, 4, (4,), generator=g)
    x_adv = pgd(_small_net(), x, y, eps=0.1, step_size=0.05, steps=3, generator=g)
    check_in_ball(x_adv, x, 0.1, "linf")  # fine before planting
    bad = x_adv.clone()
    plant(bad)
    with pytest.raises(BallViolationError, match=re.escape(message)):
        check_in_ball(bad, x, 0.1, "linf")


def test_check_in_ball_l2_and_shape():
    x = torch.full((2, 3), 0.5)
    x_adv = x.clone()
    x_adv[1] += torch.tensor([0.3, 0.4, 0.0])  # l2 distance 0.5
    assert math.isclose(check_in_ball(x_adv, x, 0.5, "l2"), 0.5, rel_tol=1e-6)
    with pytest.raises(BallViolationError, match="examples \\[1\\]"):
        check_in_ball(x_adv, x, 0.49, "l2")
    with pytest.raises(BallViolationError, match="shape"):
        check_in_ball(x_adv[:1], x, 0.5, "l2")


# --------------------------------------------------------------------------------------------------------
# exact optima on linear models


def test_l2_pgd_on_linear_model_finds_exact_minimal_margin_direction():
    """Binary linear classifier: the l2 perturbation that most lowers the margin is eps * (w_j - w_y)/||.||."""
    d, eps = 16, 0.3
    model = _linear_binary(d)
    x = torch.full((4, d), 0.5)  # interior point: the box never binds (|delta_i| <= eps < 0.5)
    y = torch.tensor([0, 1, 0, 1])
    w = model.weight.detach()
    sign = torch.where(y == 0, 1.0, -1.0)[:, None]
    optimum = eps * sign * (w[1] - w[0]) / (w[1] - w[0]).norm()  # row i: eps * (w_j - w_y) / ||w_j - w_y||
    for loss in ("ce", "margin"):
        x_adv = pgd(model, x, y, eps=eps, step_size=eps / 4, steps=10, norm="l2", random_start="none",
                    loss=loss, confidence=1e3)
        assert torch.allclose(x_adv - x, optimum, atol=1e-6), loss
        # the margin drops by exactly eps * ||w_j - w_y||, the largest possible drop in the l2 ball
        drop = logit_margin(model(x), y) - logit_margin(model(x_adv), y)
        assert torch.allclose(drop.detach(), eps * (w[1] - w[0]).norm().expand(4), rtol=1e-5)
        # from a random start inside the ball, projected ascent converges to the same boundary point
        x_rs = pgd(model, x, y, eps=eps, step_size=eps, steps=60, norm="l2", random_start="uniform", loss=loss,
                   confidence=1e3, generator=torch.Generator().manual_seed(0))
        cos = F.cosine_similarity(x_rs - x, optimum, dim=1)
        assert bool((cos > 0.999).all()) and torch.allclose((x_rs - x).norm(dim=1), torch.full((4,), eps))


def test_linf_pgd_and_fgsm_on_linear_model_hit_the_sign_vertex():
    d, eps = 16, 0.1
    model = _linear_binary(d, seed=3)
    x = torch.full((2, d), 0.5)
    y = torch.tensor([0, 1])
    w = model.weight.detach()
    expected = torch.stack([eps * (w[1] - w[0]).sign(), eps * (w[0] - w[1]).sign()])
    x_pgd = pgd(model, x, y, eps=eps, step_size=eps / 4, steps=8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x_pgd - x, expected, atol=1e-6)
    x_fgsm = fgsm(model, x, y, eps=eps)
    assert torch.allclose(x_fgsm - x, expected, atol=1e-6)
    x_cw = cw_inf(model, x, y, eps=eps, step_size=eps / 4, steps=8, confidence=1e3,
                  generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x_cw - x, expected, atol=1e-6)


def test_margin_and_cw_loss_closed_form():
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, -1.0]])
    y = torch.tensor([0, 2])
    assert torch.allclose(logit_margin(logits, y), torch.tensor([0.5, -5.0]))
    assert torch.allclose(cw_loss(logits, y), torch.tensor([-0.5, 0.0]))
    assert torch.allclose(cw_loss(logits, y, confidence=10.0), torch.tensor([-10.5, -5.0]))


# --------------------------------------------------------------------------------------------------------
# hygiene: modes, gradients, losses, rng


def test_modes_restored_and_no_grad_leak():
    model = _small_net()
    model.train()
    model[2].eval()  # mixed flags must come back exactly
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    x = torch.rand(5, 1, 4, 4)
    y = torch.randint(0, 4, (5,))
    running = model[2].running_mean.clone()
    for bn_mode in ("eval", "keep", "train"):
        pgd(model, x, y, eps=0.1, step_size=0.05, steps=2, bn_mode=bn_mode)
        assert model.training and not model[2].training and model[1].training
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert not torch.equal(model[2].running_mean, running)  # only "train" uses and updates batch statistics
    model2 = _small_net()
    model2.train()
    before = model2[2].running_mean.clone()
    pgd(model2, x, y, eps=0.1, step_size=0.05, steps=2, bn_mode="eval")
    assert torch.equal(model2[2].running_mean, before) and model2.training


def test_bn_mode_changes_the_attack_objective():
    torch.manual_seed(0)
    model = _small_net()
    with torch.no_grad():
        model[2].running_mean.fill_(3.0)
        model[2].running_var.fill_(0.1)
    x = torch.rand(8, 1, 4, 4)
    y = torch.randint(0, 4, (8,))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = pgd(model, x, y, eps=0.2, step_size=0.05, steps=3, bn_mode="eval", generator=g())
    b = pgd(model, x, y, eps=0.2, step_size=0.05, steps=3, bn_mode="train", generator=g())
    assert not torch.equal(a, b)


def test_callable_loss_trades_style_and_shape_check():
    model = _small_net(bn=False)
    x = torch.rand(6, 1, 4, 4)
    y = torch.randint(0, 4, (6,))
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)

    def kl(m, x_adv, x0, y0):
        return F.kl_div(F.log_softmax(m(x_adv), dim=1), p_clean, reduction="none").sum(dim=1)

    x_adv = pgd(model, x, y, eps=0.1, step_size=0.02, steps=5, random_start="normal", loss=kl,
                generator=torch.Generator().manual_seed(0))
    check_in_ball(x_adv, x, 0.1)
    assert kl(model, x_adv, x, y).sum() > kl(model, x + 0.0, x, y).sum()
    with pytest.raises(ValueError, match="one value per example"):
        pgd(model, x, y, eps=0.1, step_size=0.02, steps=1, loss=lambda m, a, b, c: m(a).sum())


def test_pgd_increases_loss_and_restarts_never_hurt():
    torch.manual_seed(0)
    model = _small_net(bn=False)
    x = torch.rand(32, 1, 4, 4)
    y = torch.randint(0, 4, (32,))
    ce = lambda xa: F.cross_entropy(model(xa), y, reduction="none")  # noqa: E731
    one = pgd(model, x, y, eps=0.1, step_size=0.025, steps=10, generator=torch.Generator().manual_seed(0))
    assert (ce(one) >= ce(x) - 1e-6).float().mean() > 0.9
    many = pgd(model, x, y, eps=0.1, step_size=0.025, steps=10, restarts=3,
               generator=torch.Generator().manual_seed(0))
    fooled_one = model(one).argmax(1) != y
    fooled_many = model(many).argmax(1) != y
    assert bool((fooled_many | ~fooled_one).all())  # restart 1 is among the candidates


def test_generator_reproducible_and_global_rng_untouched():
    model = _small_net(bn=False)
    x = torch.rand(4, 1, 4, 4)
    y = torch.randint(0, 4, (4,))
    state = torch.get_rng_state()
    a = pgd(model, x, y, eps=0.1, step_size=0.02, steps=2, generator=torch.Generator().manual_seed(5))
    b = pgd(model, x, y, eps=0.1, step_size=0.02, steps=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)


def test_nan_logits_raise():
    class NaNNet(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :3] * float("nan")

    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="NaN"):
        pgd(NaNNet(), x, torch.zeros(2, dtype=torch.int64), eps=0.1, step_size=0.01, steps=1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"eps": -0.1}, ValueError, "eps"),
        ({"norm": "l1"}, ValueError, "valid: linf, l2"),
        ({"random_start": "gauss"}, ValueError, "uniform, normal, none"),
        ({"loss": "hinge"}, ValueError, "ce, margin"),
        ({"bn_mode": "frozen"}, ValueError, "eval, train, keep"),
        ({"steps": -1}, ValueError, "steps"),
        ({"restarts": 0}, ValueError, "restarts"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model = _small_net(bn=False)
    x = torch.rand(2, 1, 4, 4)
    y = torch.zeros(2, dtype=torch.int64)
    args = {"eps": 0.1, "step_size": 0.01, "steps": 1, **kwargs}
    with pytest.raises(error, match=match):
        pgd(model, x, y, **args)


def test_bad_inputs():
    model = _small_net(bn=False)
    y = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd(model, torch.full((2, 1, 4, 4), 2.0), y, eps=0.1, step_size=0.01, steps=1)
    with pytest.raises(TypeError, match="int64"):
        pgd(model, torch.rand(2, 1, 4, 4), y.int(), eps=0.1, step_size=0.01, steps=1)
    with pytest.raises(TypeError, match="floating"):
        pgd(model, torch.zeros(2, 1, 4, 4, dtype=torch.uint8), y, eps=0.1, step_size=0.01, steps=1)


# --------------------------------------------------------------------------------------------------------
# presets


def test_presets_cover_the_contract_and_run():
    names = set(list_attack_presets())
    assert {"pgd20", "cw20", "fgsm", "pgd10", "pgd50-restarts", "pgd-l2", "aa", "aa-plus", "aa-rand"} <= names
    p = get_attack_preset("pgd20")
    assert (p.steps, p.kind, p.norm) == (20, "pgd", "linf")
    assert math.isclose(p.step_fraction * 8 / 255, 0.8 / 255)  # paper code: step 0.8/255 at eps 8/255
    cw = get_attack_preset("cw20")
    assert (cw.kind, cw.steps, cw.loss, cw.confidence) == ("cw", 20, "margin", 0.0)
    model = _small_net(bn=False)
    x = torch.rand(3, 1, 4, 4)
    y = torch.randint(0, 4, (3,))
    for name in ("pgd20", "cw20", "fgsm", "fgsm-rs", "pgd-l2"):
        preset = get_attack_preset(name)
        check_in_ball(preset.run(model, x, y, eps=0.1), x, 0.1, preset.norm)
    with pytest.raises(ValueError, match="experiments.evaluate"):
        get_attack_preset("aa").run(model, x, y, eps=0.1)


def test_preset_errors_and_custom_lists():
    with pytest.raises(ValueError, match="valid: aa, aa-plus, aa-rand, cw20, fgsm, fgsm-rs, gama-pgd100"):
        get_attack_preset("pgd7")
    custom = get_attack_preset("aa-custom:apgd-ce+apgd-t")
    assert custom.version == "custom" and custom.attacks == ("apgd-ce", "apgd-t")
    with pytest.raises(ValueError, match="apgd-ce, apgd-dlr"):
        get_attack_preset("aa-custom:apgd-xx")
    with pytest.raises(ValueError, match="unknown preset field"):
        get_attack_preset("pgd20").with_overrides(stepz=3)
    assert get_attack_preset("pgd20").with_overrides(steps=3).steps == 3


# --------------------------------------------------------------------------------------------------------
# GAMA-PGD


def reference_gama(model, x, y, eps, steps, step, marks, decay, weight, relax, generator):
    """GAMA-PGD written out from the paper's description: random-sign start, softmax margin plus a squared l2
    relaxation to the start's softmax whose weight falls linearly to 0, signed steps, step decays."""
    noise = eps * torch.sign(torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1)
    xa = torch.clamp(x + noise, 0, 1)
    with torch.no_grad():
        p0 = F.softmax(model(xa), dim=1)
    onehot = F.one_hot(y, p0.shape[1]).bool()
    for t in range(steps):
        if t in marks:
            step = step / decay
        xa = xa.detach().requires_grad_(True)
        q = F.softmax(model(xa), dim=1)
        margin = q.masked_fill(onehot, -1.0).max(dim=1).values - q[onehot]
        lam = weight * max(0.0, 1 - t / relax)
        (g,) = torch.autograd.grad((margin + lam * ((q - p0) ** 2).sum(dim=1)).sum(), xa)
        xa = torch.clamp(torch.min(torch.max(xa.detach() + step * g.sign(), x - eps), x + eps), 0, 1)
    return xa


def test_gama_final_iterate_equals_the_reference_loop():
    torch.manual_seed(0)
    model = _small_net(bn=False).double().eval()
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (6,), generator=torch.Generator().manual_seed(2))
    eps = 0.1
    ours = gama_pgd(model, x, y, eps=eps, steps=12, step_size=0.05, milestones=(5, 9), relax_steps=4,
                    keep_best=False, generator=torch.Generator().manual_seed(3))
    expected = reference_gama(model, x, y, eps, 12, 0.05, {5, 9}, 10.0, 50.0, 4, torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


def test_gama_keeps_the_best_iterate_stays_in_the_ball_and_runs_as_a_preset():
    torch.manual_seed(4)
    model = _small_net(bn=False).eval()
    x, y = torch.rand(32, 1, 4, 4), torch.randint(0, 4, (32,))
    eps = 0.2

    def margin(xa):
        with torch.no_grad():
            q = F.softmax(model(xa), dim=1)
        return -logit_margin(q, y)

    last = gama_pgd(model, x, y, eps=eps, steps=20, keep_best=False, generator=torch.Generator().manual_seed(5))
    best = gama_pgd(model, x, y, eps=eps, steps=20, generator=torch.Generator().manual_seed(5))
    for xa in (last, best):
        check_in_ball(xa, x, eps, "linf")
    assert bool((margin(best) >= margin(last) - 1e-7).all())
    preset = get_attack_preset("gama-pgd100")
    assert (preset.kind, preset.steps, preset.step_fraction) == ("gama", 100, 2.0)
    out = preset.run(model, x, y, eps=eps, generator=torch.Generator().manual_seed(6))
    check_in_ball(out, x, eps, "linf")
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
        robust = clean_ok & (model(out).argmax(1) == y)
    assert robust.sum() < clean_ok.sum()  # it finds adversarial examples on an undefended net
    with pytest.raises(ValueError, match="unknown anchor"):
        gama_pgd(model, x, y, eps=eps, steps=2, anchor="mean")
