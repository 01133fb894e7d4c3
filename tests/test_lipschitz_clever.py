"""CLEVER: linear classifiers give the exact dual norm; the reverse-Weibull fit finds end points."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lipschitz.clever import clever, fit_reverse_weibull
from spectral.guarantee import Guarantee


def _linear_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 5)).double()


@pytest.mark.parametrize("norm,q", [("l2", 2), ("linf", 1), ("l1", float("inf"))])
def test_linear_targeted_equals_dual_norm(norm, q):
    model = _linear_classifier()
    x0 = torch.rand(1, 4, 4, dtype=torch.float64)
    c = int(model(x0[None]).argmax())
    j = (c + 1) % 5
    res = clever(model, x0, norm=norm, target=j, n_batches=5, batch_size=8, radius=0.5)
    w = model[1].weight.detach()
    expected = float(torch.linalg.vector_norm(w[c] - w[j], ord=q))
    assert res.lipschitz.value == pytest.approx(expected, rel=1e-6)
    assert res.lipschitz.guarantee is Guarantee.ESTIMATE
    logits = model(x0[None]).detach()[0]
    margin = float(logits[c] - logits[j])
    assert res.score.value == pytest.approx(min(margin / expected, 0.5), rel=1e-6)


def test_linear_untargeted_is_min_over_targets():
    model = _linear_classifier(1)
    x0 = torch.rand(1, 4, 4, dtype=torch.float64)
    res = clever(model, x0, norm="l2", n_batches=3, batch_size=4, radius=10.0)
    logits = model(x0[None])[0].detach()
    w = model[1].weight.detach()
    c = int(logits.argmax())
    scores = [float((logits[c] - logits[j]) / torch.linalg.vector_norm(w[c] - w[j])) for j in range(5) if j != c]
    assert res.score.value == pytest.approx(min(min(scores), 10.0), rel=1e-6)
    assert res.predicted_class == c and len(res.per_target) == 4
    assert res.to_dict()["score"]["guarantee"] == "estimate"


def test_weibull_fit_recovers_end_point():
    from scipy import stats

    rng = np.random.default_rng(0)
    # reverse Weibull with right end point 3.0: sample = 3 - weibull_min(c=4, scale=0.5)
    sample = 3.0 - stats.weibull_min.rvs(4.0, scale=0.5, size=200, random_state=rng)
    fit = fit_reverse_weibull(sample)
    assert fit.fallback is None and fit.p_value >= 1e-3
    assert fit.lipschitz == pytest.approx(3.0, rel=0.05)
    assert fit.lipschitz >= fit.sample_max - 1e-9 or abs(fit.lipschitz - fit.sample_max) < 0.05


def test_weibull_fit_falls_back_to_max_on_bad_fit():
    sample = np.array([1.0] * 50 + [5.0] * 50)  # bimodal: no reverse Weibull fits it
    fit = fit_reverse_weibull(sample)
    assert fit.fallback == "ill_conditioned_fit" and fit.lipschitz == 5.0


def test_nonlinear_model_estimate_close_to_sampled_max():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    x0 = torch.rand(1, 4, 4, dtype=torch.float64)
    res = clever(model, x0, norm="linf", n_batches=20, batch_size=32, radius=0.3)
    fit = res.lipschitz.details["fit"]
    assert np.isfinite(res.lipschitz.value) and res.lipschitz.value > 0
    assert res.lipschitz.value == pytest.approx(fit["sample_max"], rel=0.25)


def test_bad_inputs():
    model = _linear_classifier()
    x0 = torch.rand(1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="norm"):
        clever(model, x0, norm="l3")
    c = int(model(x0[None]).argmax())
    with pytest.raises(ValueError, match="target"):
        clever(model, x0, target=c)
    with pytest.raises(ValueError, match="batch maxima"):
        fit_reverse_weibull([1.0])
