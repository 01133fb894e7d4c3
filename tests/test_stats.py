"""experiments.stats: intervals against closed forms and simulations, paired differences, wording."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from experiments import stats


def test_summary_mean_std_and_bootstrap_interval_contain_the_mean():
    values = [0.80, 0.83, 0.81, 0.86, 0.84]
    s = stats.summarize(values)
    assert s.n == 5 and s.mean == pytest.approx(np.mean(values)) and s.std == pytest.approx(np.std(values, ddof=1))
    assert s.interval.low < s.mean < s.interval.high
    assert s.interval.low >= min(values) - 1e-12 and s.interval.high <= max(values) + 1e-12
    assert stats.summarize(values).to_dict() == s.to_dict()  # deterministic resampling


def test_degenerate_and_tiny_samples():
    assert stats.summarize([0.5]).interval is None and stats.summarize([0.5]).std == 0.0
    flat = stats.summarize([0.7, 0.7, 0.7])
    assert flat.interval.low == flat.interval.high == pytest.approx(0.7)
    assert stats.summarize([]).n == 0
    assert stats.summarize([1.0, float("nan"), None, 3.0]).n == 2


def test_bootstrap_interval_of_a_large_normal_sample_matches_the_normal_theory_interval():
    rng = np.random.default_rng(1)
    x = rng.normal(10.0, 2.0, size=400)
    ci = stats.bootstrap_interval(x, n_resamples=4000)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert ci.low == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert ci.high == pytest.approx(x.mean() + half, abs=0.1 * half)


def test_binomial_interval_is_clopper_pearson_and_covers_the_estimate():
    ci = stats.binomial_interval(300, 359)
    ref = sps.binomtest(300, 359).proportion_ci(0.95, method="exact")
    assert (ci.low, ci.high) == pytest.approx((ref.low, ref.high))
    # Clopper-Pearson closed form via the beta quantiles
    assert ci.low == pytest.approx(sps.beta.ppf(0.025, 300, 60))
    assert ci.high == pytest.approx(sps.beta.ppf(0.975, 301, 59))
    acc = stats.accuracy_interval(300 / 359, 359)
    assert (acc.low, acc.high) == (ci.low, ci.high)
    with pytest.raises(ValueError, match="successes"):
        stats.binomial_interval(5, 3)
    with pytest.raises(ValueError, match="accuracy"):
        stats.accuracy_interval(1.2, 10)


def test_paired_difference_uses_common_seeds_and_both_intervals():
    a = {0: 0.80, 1: 0.82, 2: 0.81, 3: 0.79, 4: 0.80}
    b = {s: v + 0.05 + 0.001 * s for s, v in a.items()}
    b[9] = 1.0  # a seed only b has is ignored
    d = stats.paired_difference(a, b, a_name="wide", b_name="narrow", metric="robust_acc")
    assert d.n == 5 and d.seeds == (0, 1, 2, 3, 4)
    assert d.mean == pytest.approx(0.052)
    assert d.detectable
    ref = sps.t.interval(0.95, 4, loc=d.mean, scale=np.std([b[s] - a[s] for s in a], ddof=1) / math.sqrt(5))
    assert (d.t_interval.low, d.t_interval.high) == pytest.approx(ref)
    text = stats.describe_difference(d, "narrowing the last stage")
    assert text.startswith("narrowing the last stage raises robust_acc by +5.20") and "5 seeds" in text


def test_a_difference_inside_the_noise_is_no_detectable_difference():
    rng = np.random.default_rng(0)
    a = {s: 0.8 + 0.02 * rng.standard_normal() for s in range(5)}
    b = {s: a[s] + 0.02 * rng.standard_normal() for s in range(5)}
    d = stats.paired_difference(a, b, metric="robust_acc")
    assert d.interval.contains(0.0) or d.t_interval.contains(0.0)
    assert not d.detectable
    assert "no detectable difference" in stats.describe_difference(d, "x")
    one = stats.paired_difference({0: 0.8}, {0: 0.9}, metric="m")
    assert not one.detectable and "no claim" in stats.describe_difference(one, "x")


def test_detectable_requires_the_t_interval_too_with_few_seeds():
    # three seeds, differences 0.01, 0.02, 0.10: the percentile-style bootstrap excludes 0 (all positive), the t
    # interval with 2 degrees of freedom does not: no claim
    d = stats.paired_difference({0: 0.0, 1: 0.0, 2: 0.0}, {0: 0.01, 1: 0.02, 2: 0.10})
    assert d.interval.low > 0
    assert d.t_interval.contains(0.0)
    assert not d.detectable


def test_rank_correlation_and_its_interval():
    x = [1, 2, 3, 4, 5, 6, 7, 8]
    perfect = stats.rank_correlation(x, [10, 20, 30, 40, 50, 60, 70, 80])
    assert perfect.rho == pytest.approx(1.0) and perfect.detectable
    assert perfect.interval.high == pytest.approx(1.0)
    ref = sps.spearmanr(x, [3, 1, 4, 1, 5, 9, 2, 6])
    noisy = stats.rank_correlation(x, [3, 1, 4, 1, 5, 9, 2, 6], x_name="params", y_name="robust_acc")
    assert noisy.rho == pytest.approx(ref.statistic) and noisy.p_value == pytest.approx(ref.pvalue)
    assert noisy.interval.contains(noisy.rho) and not noisy.detectable
    assert "no detectable rank correlation" in stats.describe_correlation(noisy)
    assert stats.rank_correlation([1, 2], [3, 4]).rho is None
    assert stats.rank_correlation([1, 1, 1], [3, 4, 5]).note


def test_bootstrap_interval_coverage_is_roughly_nominal_for_moderate_n():
    """A test that can fail: over 200 simulated samples of n=30 the 95% interval covers the true mean 88-99%."""
    rng = np.random.default_rng(5)
    hits = sum(stats.bootstrap_interval(rng.exponential(1.0, 30), n_resamples=999, seed=i).contains(1.0) for i in range(200))
    assert 0.88 <= hits / 200 <= 0.99
