"""Random-matrix predictions against dense SVD and exact FFT norms (spectral) of sampled kernels."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipschitz.theory import random_matrix as rm
from lipschitz.theory.montecarlo import validate_conv_predictions, validate_tail_bound
from spectral.guarantee import Guarantee


def _mean_norm(rows, cols, samples, complex_=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(samples, rows, cols, generator=g, dtype=torch.float64)
    if complex_:
        a = torch.complex(a, torch.randn(samples, rows, cols, generator=g, dtype=torch.float64)) / math.sqrt(2)
    s = torch.linalg.matrix_norm(a, ord=2)
    return float(s.mean()), float(s.std() / math.sqrt(samples))


@pytest.mark.parametrize("rows,cols,field", [(64, 64, "real"), (64, 16, "real"), (48, 48, "complex"),
                                             (16, 64, "complex")])
def test_tracy_widom_mean_matches_dense_svd(rows, cols, field):
    mean, se = _mean_norm(rows, cols, 400, complex_=field == "complex")
    pred = rm.gaussian_norm_tracy_widom(rows, cols, 1.0, field=field)
    assert pred.guarantee is Guarantee.ESTIMATE
    assert abs(pred.value / mean - 1) < 0.01 + 3 * se / mean
    # the finite-size correction is sharper than the leading order
    assert abs(pred.value - mean) < abs(math.sqrt(rows) + math.sqrt(cols) - mean)


def test_gordon_bounds_the_expectation_and_std_scales():
    mean, se = _mean_norm(40, 10, 800)
    gordon = rm.gordon_expected_norm_bound(40, 10, std=1.0)
    assert gordon.guarantee is Guarantee.UPPER and "expectation" in gordon.details["bounds"]
    assert mean + 3 * se <= gordon.value
    assert rm.gordon_expected_norm_bound(40, 10, std=0.5).value == pytest.approx(gordon.value / 2)


def test_tail_bound_holds_in_monte_carlo():
    rows = validate_tail_bound(24, 12, t_values=(0.0, 0.25, 0.5, 1.0, 2.0), n_samples=3000, seed=1)
    for r in rows:
        assert r["violation_rate"] <= r["bound"] + r["hoeffding_margin_999"], r
    assert rows[0]["violation_rate"] < 1.0  # t=0 bound is vacuous; the mean sits below Gordon's edge
    assert rows[0]["mean_s_max"] < rows[0]["gordon_mean_bound"]


def test_high_probability_bound_violation_rate_below_delta():
    delta = 0.2
    g = torch.Generator().manual_seed(3)
    s = torch.linalg.matrix_norm(torch.randn(3000, 10, 30, generator=g, dtype=torch.float64), ord=2)
    bound = rm.gaussian_norm_high_probability(10, 30, 1.0, delta=delta)
    assert bound.guarantee is Guarantee.PROBABILISTIC_UPPER
    rate = float((s > bound.value).double().mean())
    assert rate <= delta + math.sqrt(math.log(1000) / 6000)


@pytest.mark.parametrize("init", ["fixed", "kaiming_normal_fan_in", "kaiming_normal_fan_out", "pytorch_default"])
def test_conv_prediction_within_5_percent_c64_k3(init):
    rows = validate_conv_predictions([(64, 64, 3, 8, 1)], init=init, std=0.1, n_samples=3, seed=0, progress=False)
    r = rows[0]
    assert r["measured_guarantee"] == "exact" and r["prediction_guarantee"] == "estimate"
    assert abs(r["rel_err_tracy_widom"]) < 0.05, r
    assert abs(r["rel_err_leading"]) < 0.05, r


def test_conv_prediction_non_square_strided_and_1x1():
    rows = validate_conv_predictions([(32, 16, 3, 8, 2), (32, 16, 1, 8, 2), (16, 48, 3, 8, 1)], std=1.0,
                                     n_samples=3, seed=2, progress=False)
    for r in rows:
        assert abs(r["rel_err_tracy_widom"]) < 0.05, r


def test_monte_carlo_writes_json_csv_png(tmp_path):
    validate_conv_predictions([(8, 8, 3, 8, 1)], n_samples=1, out_dir=tmp_path, progress=False)
    for name in ("theory_conv_predictions.json", "theory_conv_predictions.csv", "theory_conv_predictions.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_init_closed_forms_are_width_independent():
    for c in (16, 64, 640):
        assert rm.init_norm_constant("kaiming_normal_fan_in", c, c) == pytest.approx(2 * math.sqrt(2))
        assert rm.init_norm_constant("kaiming_normal_fan_out", c, c) == pytest.approx(2 * math.sqrt(2))
        assert rm.init_norm_constant("pytorch_default", c, c) == pytest.approx(2 / math.sqrt(3))
    assert rm.init_norm_constant("kaiming_normal_fan_in", 4 * 64, 64) == pytest.approx(math.sqrt(2) * 3)
    assert rm.init_norm_constant("kaiming_normal_fan_out", 4 * 64, 64) == pytest.approx(math.sqrt(2) * 1.5)
    # fixed variance: grows like sqrt(width)
    ratio = rm.init_norm_constant("fixed", 256, 256, std=0.1) / rm.init_norm_constant("fixed", 64, 64, std=0.1)
    assert ratio == pytest.approx(2.0)


def test_pytorch_default_std_matches_torch_init():
    conv = torch.nn.Conv2d(200, 100, 3, bias=False)
    assert float(conv.weight.detach().std()) == pytest.approx(rm.init_std("pytorch_default", 100, 200, 3), rel=0.02)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 300), std=st.floats(0.01, 10))
def test_generalised_mp_edge_reduces_to_gordon(rows, cols, std):
    edge = rm.generalized_mp_edge(rows, [std ** 2] * cols)
    assert edge == pytest.approx(std * (math.sqrt(rows) + math.sqrt(cols)), rel=1e-5)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(2, 400), cols=st.integers(2, 400), field=st.sampled_from(["real", "complex"]))
def test_tracy_widom_mean_below_gordon(rows, cols, field):
    # E[TW] < 0, so the corrected expectation sits below the leading-order edge (which bounds E[s_max])
    assert rm.gaussian_norm_tracy_widom(rows, cols, field=field).value < \
        rm.gordon_expected_norm_bound(rows, cols).value


def test_expected_max_tracy_widom_moments_and_growth():
    assert rm.expected_max_tracy_widom(1, "real") == pytest.approx(rm.TW_MEAN[1], abs=2e-3)
    assert rm.expected_max_tracy_widom(1, "complex") == pytest.approx(rm.TW_MEAN[2], abs=2e-3)
    assert rm.expected_max_tracy_widom(1) < rm.expected_max_tracy_widom(10) < rm.expected_max_tracy_widom(100)


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(ValueError, match="valid: kaiming_normal_fan_in"):
        rm.init_std("xavier", 4, 4, 3)
    with pytest.raises(ValueError, match="needs std"):
        rm.init_std("fixed", 4, 4, 3)
    with pytest.raises(ValueError, match="positive integer"):
        rm.gordon_expected_norm_bound(0, 3)
    with pytest.raises(ValueError, match="std must be"):
        rm.conv_norm_prediction(4, 4, 3, -1.0)
    with pytest.raises(ValueError, match="valid: none, tracy_widom"):
        rm.conv_norm_prediction(4, 4, 3, 1.0, correction="exact")
    with pytest.raises(ValueError, match="valid: real, complex"):
        rm.gaussian_norm_tracy_widom(3, 3, field="quaternion")
    with pytest.raises(ValueError, match="t must be"):
        rm.gaussian_tail_bound(-1.0)
