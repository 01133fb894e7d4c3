"""Training objectives equal hand-computed values on a fixed tiny batch (formulas written out with math)."""
from __future__ import annotations

import math

import pytest
import torch

from experiments.training.losses import (cross_entropy, kl_clean_to_adv, mart_loss, trades_inner_loss,
                                         trades_loss)

CLEAN = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]]
ADV = [[0.5, 1.5, -0.5], [1.0, -1.0, 0.0]]
Y = [0, 2]


def _softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def _ce(z, y):
    return -math.log(_softmax(z)[y])


def _kl(p, q):  # KL(p || q)
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def _t(v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype)


def test_cross_entropy_by_hand():
    want = (_ce(ADV[0], 0) + _ce(ADV[1], 2)) / 2
    assert cross_entropy(_t(ADV), torch.tensor(Y)).item() == pytest.approx(want, rel=1e-6)
    # label smoothing 0.1: (1-0.1)*CE + 0.1 * mean_k(-log p_k)
    ls = sum(0.9 * _ce(z, y) + 0.1 * sum(-math.log(p) for p in _softmax(z)) / 3 for z, y in zip(ADV, Y)) / 2
    assert cross_entropy(_t(ADV), torch.tensor(Y), 0.1).item() == pytest.approx(ls, rel=1e-6)


def test_trades_loss_by_hand_and_kl_direction():
    beta = 6.0
    kl = [_kl(_softmax(c), _softmax(a)) for c, a in zip(CLEAN, ADV)]
    reverse = [_kl(_softmax(a), _softmax(c)) for c, a in zip(CLEAN, ADV)]
    want = (_ce(CLEAN[0], 0) + _ce(CLEAN[1], 2)) / 2 + beta * sum(kl) / 2
    got = trades_loss(_t(CLEAN), _t(ADV), torch.tensor(Y), beta).item()
    assert got == pytest.approx(want, rel=1e-6)
    wrong = (_ce(CLEAN[0], 0) + _ce(CLEAN[1], 2)) / 2 + beta * sum(reverse) / 2
    assert abs(got - wrong) > 1e-2  # KL(p_clean || p_adv), not the reverse
    assert kl_clean_to_adv(_t(CLEAN), _t(ADV)).tolist() == pytest.approx(kl, rel=1e-6)
    # the published form: nn.KLDivLoss(size_average=False)(log_softmax(adv), softmax(clean)) / batch
    published = torch.nn.KLDivLoss(reduction="sum")(torch.log_softmax(_t(ADV), 1), torch.softmax(_t(CLEAN), 1)) / 2
    assert published.item() == pytest.approx(sum(kl) / 2, rel=1e-6)
    p_clean = torch.softmax(_t(CLEAN), 1)
    assert trades_inner_loss(_t(ADV), p_clean).item() == pytest.approx(sum(kl), rel=1e-6)


def test_mart_loss_by_hand():
    beta = 6.0
    total_bce, total_kl = 0.0, 0.0
    for c, a, y in zip(CLEAN, ADV, Y):
        pa, pc = _softmax(a), _softmax(c)
        runner = max((k for k in range(3) if k != y), key=lambda k: pa[k])
        total_bce += _ce(a, y) - math.log(1.0001 - pa[runner] + 1e-12)
        kl = sum(pci * (math.log(pci) - math.log(pai + 1e-12)) for pci, pai in zip(pc, pa))
        total_kl += kl * (1.0000001 - pc[y])
    want = total_bce / 2 + beta * total_kl / 2
    got = mart_loss(_t(CLEAN), _t(ADV), torch.tensor(Y), beta).item()
    assert got == pytest.approx(want, rel=1e-6)
    # the runner-up of example 0 under ADV is class 0 == y? no: argmax is 1 != y, so runner is the top class
    assert max(range(3), key=lambda k: _softmax(ADV[0])[k]) == 1


def test_losses_are_differentiable_and_reject_bad_shapes():
    clean = _t(CLEAN).requires_grad_(True)
    adv = _t(ADV).requires_grad_(True)
    (trades_loss(clean, adv, torch.tensor(Y), 6.0) + mart_loss(clean, adv, torch.tensor(Y), 6.0)).backward()
    assert torch.isfinite(clean.grad).all() and torch.isfinite(adv.grad).all()
    with pytest.raises(ValueError, match="logits must be"):
        cross_entropy(torch.zeros(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels must be"):
        mart_loss(_t(CLEAN), _t(ADV), torch.tensor([0]), 1.0)
