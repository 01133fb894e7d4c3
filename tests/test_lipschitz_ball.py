"""lipschitz.ball against its definitions: draws inside the ball, projections are the nearest point, steps."""
import math

import pytest
import torch

from lipschitz.ball import (ascent_direction, ascent_step, clamp_linf, flat_norm, linf_box, per_example, project,
                            project_delta, random_in_ball)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_in_ball_stays_inside_and_fills_it(norm):
    eps, shape = 0.3, (4000, 3, 2, 2)
    d = random_in_ball(shape, eps, norm, generator=_gen(), dtype=torch.float64)
    size = flat_norm(d, math.inf if norm == "linf" else 2.0)
    assert bool((size <= eps * (1 + 1e-12)).all())
    if norm == "l2":  # uniform in the ball: P(||d|| <= eps/2) = 2^-12 in 12 dimensions; radius^12 is U(0, 1)
        u = (size / eps) ** 12
        assert abs(float(u.mean()) - 0.5) < 0.03
    else:
        assert abs(float(d.mean())) < 0.01 and abs(float((d / eps).pow(2).mean()) - 1 / 3) < 0.01
    again = random_in_ball(shape, eps, norm, generator=_gen(), dtype=torch.float64)
    assert torch.equal(d, again)


def test_random_in_ball_takes_a_per_example_radius():
    radius = per_example(torch.tensor([0.1, 2.0], dtype=torch.float64), 3)
    d = random_in_ball((2, 5, 5), radius, "linf", generator=_gen(), dtype=torch.float64)
    assert float(d[0].abs().max()) <= 0.1 and float(d[1].abs().max()) > 0.5


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_project_delta_is_the_nearest_point_of_the_ball(norm):
    torch.manual_seed(0)
    delta = torch.randn(64, 10, dtype=torch.float64)
    eps = 0.8
    p = project_delta(delta, eps, norm)
    if norm == "linf":
        ref = torch.minimum(torch.maximum(delta, torch.full_like(delta, -eps)), torch.full_like(delta, eps))
    else:
        n = delta.norm(dim=1, keepdim=True)
        ref = torch.where(n > eps, delta * eps / n, delta)
    assert torch.allclose(p, ref, atol=1e-15)
    # no other point of the ball is nearer: random points of the ball are at least as far
    others = random_in_ball((64, 10), eps, norm, generator=_gen(1), dtype=torch.float64)
    assert bool((flat_norm(delta - p) <= flat_norm(delta - others) + 1e-12).all())
    assert torch.equal(project_delta(p, eps, norm), p) or torch.allclose(project_delta(p, eps, norm), p, atol=1e-15)


def test_project_keeps_the_box_and_the_ball_and_matches_linf_box():
    torch.manual_seed(1)
    x = torch.rand(32, 1, 4, 4, dtype=torch.float64)
    x_adv = x + torch.randn_like(x)
    eps = 0.1
    for norm in ("linf", "l2"):
        p = project(x_adv, x, eps, norm)
        assert float(p.min()) >= 0 and float(p.max()) <= 1
        assert bool((flat_norm(p - x, math.inf if norm == "linf" else 2.0) <= eps + 1e-12).all())
    lo, hi = linf_box(x, eps)
    assert torch.allclose(torch.clamp(x_adv, lo, hi), project(x_adv, x, eps, "linf"), atol=1e-15)
    assert torch.equal(clamp_linf(x_adv, x, eps), torch.clamp(x_adv, lo, hi))  # the same comparisons, no arithmetic


def test_ascent_steps():
    torch.manual_seed(2)
    g = torch.randn(8, 3, 3, dtype=torch.float64)
    x = torch.zeros_like(g)
    assert torch.equal(ascent_step(x, g, 0.5, "linf"), 0.5 * g.sign())
    step = ascent_step(x, g, 0.5, "l2")
    assert torch.allclose(flat_norm(step), torch.full((8,), 0.5, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(step, 0.5 * ascent_direction(g, "l2"), atol=1e-15)
    assert torch.equal(ascent_direction(torch.zeros_like(g), "l2"), torch.zeros_like(g))
