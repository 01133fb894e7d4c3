"""Inner attack, schedules, EMA, data order, checkpoint atomicity and RNG capture, each against ground truth."""
from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from experiments.training.adversary import craft, frozen_parameters, start_noise
from experiments.training.checkpointing import (atomic_torch_save, atomic_write, capture_rng_states,
                                                load_resume_state, restore_rng_states)
from experiments.training.distributed import shard_bounds
from experiments.training.ema import ModelEMA, ema_decay
from experiments.training.schedules import lr_at


def _net(seed: int = 0, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 4, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)]
    return nn.Sequential(*layers)


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _reference_pgd(model, x, y, eps, step, steps, start):
    """TRADES-repo style loop: model.eval(), per-step autograd.grad, max/min projection then clamp."""
    model.eval()
    x_adv = torch.clamp(torch.min(torch.max(x + start, x - eps), x + eps), 0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + step * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv


def test_craft_equals_the_reference_loop_bit_for_bit():
    model = _net()
    model.train()
    x, y = _batch()
    eps, step = 0.1, 0.03
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ours = craft(model, x, y, eps=eps, step_size=step, steps=4, random_start="uniform", generator=g1)
    assert model.training  # mode restored
    start = (torch.rand(x.shape, generator=g2) * 2 - 1) * eps
    ref = _reference_pgd(model, x, y, eps, step, 4, start)
    assert torch.equal(ours, ref)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


@settings(max_examples=12, deadline=None)
@given(eps=st.floats(0.0, 0.5), steps=st.integers(0, 3), start=st.sampled_from(["uniform", "normal", "none"]),
       objective=st.sampled_from(["ce", "kl"]), norm=st.sampled_from(["linf", "l2"]), seed=st.integers(0, 10))
def test_adversarial_examples_stay_in_the_ball_and_box(eps, steps, start, objective, norm, seed):
    model = _net(seed)
    x, y = _batch(seed=seed)
    x_adv = craft(model, x, y, eps=eps, step_size=eps / 2 + 0.01, steps=steps, objective=objective, norm=norm,
                  random_start=start, init_std=0.3, generator=torch.Generator().manual_seed(seed))
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5) + 1e-7).all()


def test_craft_increases_the_loss_and_kl_objective_starts_at_zero():
    model = _net()
    x, y = _batch(32)
    model.eval()
    clean = F.cross_entropy(model(x), y).item()
    x_adv = craft(model, x, y, eps=0.2, step_size=0.05, steps=5, random_start="none")
    assert F.cross_entropy(model(x_adv), y).item() > clean + 0.05
    x_kl = craft(model, x, y, eps=0.2, step_size=0.05, steps=5, objective="kl", random_start="normal",
                 generator=torch.Generator().manual_seed(0))
    kl = F.kl_div(F.log_softmax(model(x_kl), 1), F.softmax(model(x), 1), reduction="batchmean").item()
    assert kl > 1e-4


def test_bn_mode_train_updates_running_stats_and_eval_does_not():
    model = _net()
    x, y = _batch()
    before = model[1].running_mean.clone()
    craft(model, x, y, eps=0.1, step_size=0.03, steps=2, bn_mode="eval")
    assert torch.equal(model[1].running_mean, before)
    craft(model, x, y, eps=0.1, step_size=0.03, steps=2, bn_mode="train")
    assert not torch.equal(model[1].running_mean, before)


def test_frozen_parameters_restores_flags():
    model = _net()
    model[0].bias.requires_grad_(False)
    with frozen_parameters(model):
        assert not any(p.requires_grad for p in model.parameters())
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad


def test_global_noise_slices_match_single_process():
    full = start_noise((8, 1, 2, 2), "normal", generator=torch.Generator().manual_seed(3), device=torch.device("cpu"),
                       dtype=torch.float32)
    for rank in range(2):
        lo, hi = shard_bounds(8, rank, 2)
        part = start_noise((hi - lo, 1, 2, 2), "normal", generator=torch.Generator().manual_seed(3),
                           device=torch.device("cpu"), dtype=torch.float32, noise_slice=(lo, hi, 8))
        assert torch.equal(part, full[lo:hi])
    with pytest.raises(ValueError, match="unknown random start"):
        start_noise((1,), "gauss", generator=None, device=torch.device("cpu"), dtype=torch.float32)


def test_schedules_closed_forms():
    assert lr_at("multistep", 0.1, 74.9, 100, milestones=[75, 90]) == pytest.approx(0.1)
    assert lr_at("multistep", 0.1, 75, 100, milestones=[75, 90]) == pytest.approx(0.01)
    assert lr_at("multistep", 0.1, 95, 100, milestones=[75, 90]) == pytest.approx(0.001)
    assert lr_at("cosine", 0.1, 0, 400) == pytest.approx(0.1)
    assert lr_at("cosine", 0.1, 200, 400) == pytest.approx(0.05)
    assert lr_at("cosine", 0.1, 400, 400) == pytest.approx(0.0, abs=1e-12)
    assert lr_at("cosine", 0.1, 1, 10, warmup_epochs=2) == pytest.approx(0.05)  # half-way through warm-up
    assert lr_at("cosine", 0.1, 6, 10, warmup_epochs=2) == pytest.approx(0.05)  # cosine over epochs 2..10
    with pytest.raises(ValueError, match="valid: constant, multistep, cosine, cyclic"):
        lr_at("step", 0.1, 0, 1)


def test_cyclic_schedule_is_one_triangle():
    assert [lr_at("cyclic", 0.2, e, 15) for e in (0, 3.75, 7.5, 11.25, 15)] == pytest.approx([0, 0.1, 0.2, 0.1, 0])
    assert lr_at("cyclic", 0.2, 2, 10, warmup_epochs=4) == pytest.approx(0.1)  # peak moved to epoch 4
    assert lr_at("cyclic", 0.2, 7, 10, warmup_epochs=4) == pytest.approx(0.1)


def test_ema_matches_the_closed_form_and_handles_buffers():
    model = _net()
    ema = ModelEMA(model, decay=0.9, warmup=False, bn="ema")
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_var.fill_(3.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    assert torch.allclose(ema.shadow[0].weight, 0.9 * w0 + 0.1 * (w0 + 1.0), atol=1e-6)
    assert torch.allclose(ema.shadow[1].running_var, torch.full((4,), 0.9 + 0.1 * 3.0))
    assert ema.shadow[1].num_batches_tracked.item() == 7
    copy = ModelEMA(model, decay=0.9, warmup=False, bn="copy")
    with torch.no_grad():
        model[1].running_var.fill_(5.0)
    copy.update(model)
    assert torch.equal(copy.shadow[1].running_var, model[1].running_var)
    assert ema_decay(0.999, 0, True) == pytest.approx(0.1) and ema_decay(0.999, 10**6, True) == 0.999
    state = ema.state_dict()
    other = ModelEMA(_net(1), decay=0.9)
    other.load_state_dict(state)
    assert other.updates == 1 and torch.equal(other.shadow[0].weight, ema.shadow[0].weight)


def reference_ema(snapshots: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """Textbook weight averaging written out on state dicts: start from the initial weights, then after update
    n (0-based) average = d_n * average + (1 - d_n) * weights with d_n = min(decay, (1 + n) / (10 + n));
    floating buffers averaged the same way, integer buffers copied."""
    avg = {k: v.clone().double() if v.is_floating_point() else v.clone() for k, v in snapshots[0].items()}
    for n, state in enumerate(snapshots[1:]):
        d = min(decay, (1 + n) / (10 + n))
        for k, v in state.items():
            avg[k] = d * avg[k] + (1 - d) * v.double() if v.is_floating_point() else v.clone()
    return avg


def test_ema_over_real_sgd_steps_equals_an_independent_implementation():
    torch.manual_seed(3)
    model = _net(3)
    model.train()
    ema = ModelEMA(model, decay=0.95, warmup=True, bn="ema")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    snapshots = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    for step in range(40):
        x, y = _batch(seed=step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        ema.update(model)
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    expected = reference_ema(snapshots, decay=0.95)
    ours = ema.shadow.state_dict()
    assert ours.keys() == expected.keys()
    for k in ours:
        if ours[k].is_floating_point():
            torch.testing.assert_close(ours[k].double(), expected[k], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(ours[k], expected[k]), k
    assert not torch.allclose(ours["0.weight"].double(), snapshots[-1]["0.weight"].double(), atol=1e-4)  # not a copy


def test_shards_cover_the_global_batch():
    assert [shard_bounds(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [shard_bounds(8, r, 2) for r in range(2)] == [(0, 4), (4, 8)]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save({"a": torch.ones(2)}, path)

    def broken(fh):
        fh.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    gen = torch.Generator().manual_seed(11)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.randn(), torch.rand(1), torch.rand(1, generator=gen)
    atomic_torch_save({"rng": capture_rng_states({"noise": gen})}, tmp_path / "r.pt")
    want = (random.random(), np.random.randn(), torch.rand(3), torch.rand(3, generator=gen))
    random.seed(9), np.random.seed(9), torch.manual_seed(9), gen.manual_seed(9)
    state = torch.load(tmp_path / "r.pt", weights_only=True)
    restore_rng_states(state["rng"], {"noise": gen})
    got = (random.random(), np.random.randn(), torch.rand(3), torch.rand(3, generator=gen))
    assert got[0] == want[0] and got[1] == want[1]
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])


def test_load_resume_state_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no resume checkpoint"):
        load_resume_state(tmp_path / "missing.pt")
    torch.save({"x": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not an archlip training resume checkpoint"):
        load_resume_state(tmp_path / "foreign.pt")
    assert math.isfinite(os.path.getsize(tmp_path / "foreign.pt"))


def test_sync_bn_on_cpu_is_rejected_clearly():
    from experiments.training.distributed import DistContext, wrap_model

    with pytest.raises(ValueError, match="sync_bn needs CUDA"):
        wrap_model(_net(), DistContext(rank=0, world_size=2), torch.device("cpu"), sync_bn=True)
