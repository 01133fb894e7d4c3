"""Yang et al.'s local Lipschitz metric: each named step rule against an independent transcription of its loop."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lipschitz.lower import local_lipschitz_metric


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).eval()


def reference_loop(model, x, eps, step, sign, offset, noise, steps=10):
    """The published loop written out: x' = x + 0.001 n; x' += step * sign(grad(sign * ratio)); project; clip."""
    xp = x + 0.001 * noise
    for _ in range(steps):
        xp = xp.detach().requires_grad_(True)
        top = (model(x) - model(xp)).abs().sum(dim=1)
        bottom = (x - xp + offset).flatten(1).abs().amax(dim=1)
        (g,) = torch.autograd.grad((sign * top / bottom).mean(), xp)
        xp = xp.detach() + step * g.sign()
        xp = torch.clamp(x + torch.clamp(xp - x, -eps, eps), 0.0, 1.0)
    with torch.no_grad():
        return ((model(x) - model(xp)).abs().sum(dim=1) / (x - xp + offset).flatten(1).abs().amax(dim=1)).mean()


@pytest.mark.parametrize("variant,step,sign,offset", [("eps/4", 0.05 / 4, 1.0, 0.0), ("step-0.003", 0.003, 1.0, 0.0),
                                                      ("yang2020-code", 0.003, -1.0, 1e-6)])
def test_each_variant_equals_its_transcription(variant, step, sign, offset):
    model, eps = _net(), 0.05
    x = torch.rand(6, 1, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model = model.double()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    ours = local_lipschitz_metric(model, x, eps, seed=7, variant=variant)
    assert ours.value.details["variant"] == variant and ours.value.details["step_size"] == pytest.approx(step)
    expected = reference_loop(model, x, eps, step, sign, offset, noise)
    assert ours.value.value == pytest.approx(float(expected), rel=1e-9)


def test_the_literal_code_descends_and_unknown_variants_are_refused():
    model, x = _net().double(), torch.rand(8, 1, 3, 4, dtype=torch.float64)
    up = local_lipschitz_metric(model, x, 0.05, variant="step-0.003").value.value
    down = local_lipschitz_metric(model, x, 0.05, variant="yang2020-code").value.value
    assert down < up  # the published loop moves against the ratio's gradient
    with pytest.raises(ValueError, match="choose one of: eps/4, step-0.003, yang2020-code"):
        local_lipschitz_metric(model, x, 0.05, variant="max")
