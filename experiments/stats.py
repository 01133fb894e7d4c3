"""Statistics for claims about trained models: intervals, paired differences, rank correlations, wording.

One home for the numbers a report may state about a set of runs (seeds x configurations):

- ``summarize(values)``: n, mean, std and a 95% bootstrap interval of the mean (``scipy.stats.bootstrap``).
- ``binomial_interval(k, n)``: exact (Clopper-Pearson) interval of one run's accuracy on n test points
  (``scipy.stats.binomtest(...).proportion_ci``): the test-set sampling error of that single number.
- ``paired_difference(a, b)``: the mean of per-seed differences b - a with its bootstrap interval and a
  Student-t interval; ``detectable`` only when BOTH exclude 0 (with 5 seeds a bootstrap interval of a mean is
  too narrow -- it resamples 5 values -- so the t interval keeps the decision honest).
- ``rank_correlation(x, y)``: Spearman's rho over configurations with a paired bootstrap interval.
- ``describe_difference`` / ``describe_correlation``: the sentences a report uses; an interval that contains 0 is
  written "no detectable difference" / "no detectable rank correlation", never as an ordering.

Every function is deterministic (fixed ``seed`` for the resampling). References: Efron & Tibshirani 1993
(bootstrap, BCa); Clopper & Pearson 1934; Spearman 1904.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 9999


@dataclass(frozen=True)
class Interval:
    """A confidence interval [low, high] at ``confidence`` and how it was computed."""

    low: float
    high: float
    confidence: float = CONFIDENCE
    method: str = "bootstrap_bca"

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Summary:
    """Mean, sample std (ddof 1) and the bootstrap interval of the mean of n values (interval None if n < 2)."""

    n: int
    mean: float
    std: float
    interval: Interval | None

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "std": self.std,
                "ci_low": None if self.interval is None else self.interval.low,
                "ci_high": None if self.interval is None else self.interval.high,
                "ci_method": None if self.interval is None else self.interval.method}


@dataclass(frozen=True)
class Difference:
    """Paired-by-seed difference ``b - a`` (mean over common seeds) with its intervals."""

    a: str
    b: str
    metric: str
    mean: float
    n: int
    seeds: tuple
    interval: Interval | None
    t_interval: Interval | None

    @property
    def detectable(self) -> bool:
        """True when both intervals exist and neither contains 0."""
        return (self.interval is not None and self.t_interval is not None
                and not self.interval.contains(0.0) and not self.t_interval.contains(0.0))

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("interval", "t_interval")}
        out["seeds"] = list(self.seeds)
        out["interval"] = None if self.interval is None else self.interval.to_dict()
        out["t_interval"] = None if self.t_interval is None else self.t_interval.to_dict()
        out["detectable"] = self.detectable
        return out


@dataclass(frozen=True)
class Correlation:
    """Spearman's rho of paired values with its p-value and a bootstrap interval over the pairs."""

    x: str
    y: str
    rho: float | None
    p_value: float | None
    n: int
    interval: Interval | None
    note: str = ""

    @property
    def detectable(self) -> bool:
        return self.rho is not None and self.interval is not None and not self.interval.contains(0.0)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "interval"}
        out["interval"] = None if self.interval is None else self.interval.to_dict()
        out["detectable"] = self.detectable
        return out


# ----------------------------------------------------------------------------------------------
# intervals
# ----------------------------------------------------------------------------------------------


def _finite_array(values: Sequence[float], what: str = "values") -> np.ndarray:
    arr = np.asarray([float(v) for v in values if v is not None], dtype=float)
    return arr[np.isfinite(arr)]


def bootstrap_interval(values: Sequence[float], statistic: Callable[[np.ndarray], float] = np.mean, *,
                       confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = 0) -> Interval | None:
    """Bootstrap interval of ``statistic`` (``scipy.stats.bootstrap``, BCa; percentile when BCa is undefined).

    None for fewer than 2 values; a constant sample gives the degenerate interval [v, v].
    """
    from scipy import stats

    arr = _finite_array(values)
    _check_confidence(confidence)
    if arr.size < 2:
        return None
    if np.all(arr == arr[0]):
        v = float(statistic(arr))
        return Interval(v, v, confidence, "degenerate (all values equal)")
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.bootstrap((arr,), _vectorized(statistic), confidence_level=confidence,
                                  n_resamples=n_resamples, method=method, random_state=np.random.default_rng(seed),
                                  vectorized=True)
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            return Interval(low, high, confidence, f"bootstrap_{method.lower()}")
    return None


def _vectorized(statistic: Callable[[np.ndarray], float]) -> Callable[..., np.ndarray]:
    """``statistic`` as scipy's vectorised form ``f(x, axis)`` (numpy reductions pass ``axis`` through)."""
    if statistic in (np.mean, np.median, np.std):
        return lambda x, axis=-1: statistic(x, axis=axis)
    return lambda x, axis=-1: np.apply_along_axis(statistic, axis, x)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval | None:
    """Student-t interval of the mean (None for fewer than 2 values)."""
    from scipy import stats

    arr = _finite_array(values)
    _check_confidence(confidence)
    if arr.size < 2:
        return None
    mean, sem = float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(arr.size))
    if sem == 0:
        return Interval(mean, mean, confidence, "t (zero spread)")
    half = float(stats.t.ppf(0.5 + confidence / 2, arr.size - 1)) * sem
    return Interval(mean - half, mean + half, confidence, "t")


def binomial_interval(successes: int, trials: int, confidence: float = CONFIDENCE, method: str = "exact") -> Interval:
    """Interval of a proportion from ``successes`` out of ``trials`` (``scipy.stats.binomtest``; Clopper-Pearson).

    References: Clopper & Pearson 1934 (exact); Wilson 1927 (``method="wilson"``).
    """
    from scipy import stats

    _check_confidence(confidence)
    if not isinstance(trials, (int, np.integer)) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    if not isinstance(successes, (int, np.integer)) or not 0 <= successes <= trials:
        raise ValueError(f"successes must be an integer in [0, {trials}], got {successes!r}")
    ci = stats.binomtest(int(successes), int(trials)).proportion_ci(confidence_level=confidence, method=method)
    return Interval(float(ci.low), float(ci.high), confidence, f"binomial_{method}")


def accuracy_interval(accuracy: float, n_points: int, confidence: float = CONFIDENCE) -> Interval:
    """Binomial interval of an accuracy measured on ``n_points`` test points (the count is rounded)."""
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1], got {accuracy!r}")
    return binomial_interval(int(round(accuracy * n_points)), int(n_points), confidence)


def summarize(values: Sequence[float], *, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
              seed: int = 0) -> Summary:
    """Mean, std (ddof 1; 0 for one value) and the bootstrap interval of the mean of the finite values."""
    arr = _finite_array(values)
    if arr.size == 0:
        return Summary(0, float("nan"), float("nan"), None)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return Summary(int(arr.size), float(arr.mean()), std,
                   bootstrap_interval(arr, confidence=confidence, n_resamples=n_resamples, seed=seed))


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


# ----------------------------------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------------------------------


def paired_difference(a: Mapping[Any, float], b: Mapping[Any, float], *, a_name: str = "a", b_name: str = "b",
                      metric: str = "", confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                      seed: int = 0) -> Difference:
    """Mean of ``b[s] - a[s]`` over the seeds ``s`` both have (finite values), with bootstrap and t intervals."""
    seeds = tuple(sorted((s for s in a if s in b and _finite(a[s]) and _finite(b[s])), key=str))
    diffs = [float(b[s]) - float(a[s]) for s in seeds]
    mean = float(np.mean(diffs)) if diffs else float("nan")
    return Difference(a_name, b_name, metric, mean, len(diffs), seeds,
                      bootstrap_interval(diffs, confidence=confidence, n_resamples=n_resamples, seed=seed),
                      t_interval(diffs, confidence))


def rank_correlation(x: Sequence[float], y: Sequence[float], *, x_name: str = "x", y_name: str = "y",
                     confidence: float = CONFIDENCE, n_resamples: int = 2999, seed: int = 0) -> Correlation:
    """Spearman's rho of the finite pairs with its p-value and a paired bootstrap (percentile) interval.

    A resample whose x or y values are all tied has no rank correlation; it counts as rho = 0 (no association),
    which widens the interval toward 0 rather than dropping the resample. Needs at least 3 pairs.
    ``n_resamples=0`` skips the interval (rho and p-value only).
    """
    from scipy import stats

    pairs = [(float(u), float(v)) for u, v in zip(x, y) if _finite(u) and _finite(v)]
    if len(pairs) < 3:
        return Correlation(x_name, y_name, None, None, len(pairs), None, "needs at least 3 pairs with both values")
    xs, ys = (np.asarray(c) for c in zip(*pairs))
    if np.all(xs == xs[0]) or np.all(ys == ys[0]):
        return Correlation(x_name, y_name, None, None, len(pairs), None, "a constant column has no rank correlation")
    result = stats.spearmanr(xs, ys)
    if n_resamples == 0:
        return Correlation(x_name, y_name, float(result.statistic), float(result.pvalue), len(pairs), None)

    def rho(u: np.ndarray, v: np.ndarray) -> float:
        if np.all(u == u[0]) or np.all(v == v[0]):
            return 0.0
        return float(stats.spearmanr(u, v).statistic)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap((xs, ys), rho, paired=True, vectorized=False, confidence_level=confidence,
                              n_resamples=n_resamples, method="percentile", random_state=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    interval = Interval(low, high, confidence, "bootstrap_percentile_over_pairs") if math.isfinite(low) else None
    return Correlation(x_name, y_name, float(result.statistic), float(result.pvalue), len(pairs), interval)


# ----------------------------------------------------------------------------------------------
# wording
# ----------------------------------------------------------------------------------------------


def describe_difference(diff: Difference, change: str, *, scale: float = 100.0, unit: str = " points") -> str:
    """One sentence: "<change> changes <metric> by +x [lo, hi]<unit> (paired by seed, n seeds)" or, when the
    intervals contain 0, "... : no detectable difference (+x [lo, hi] ...)". ``scale`` 100 shows accuracies in points.
    """
    if diff.n == 0:
        return f"{change}: no seeds in common, nothing to compare"
    what = diff.metric or "the metric"
    ci = diff.interval
    span = f" [{ci.low * scale:+.2f}, {ci.high * scale:+.2f}]" if ci is not None else ""
    core = f"{diff.mean * scale:+.2f}{span}{unit}"
    tail = f"(paired by seed, {diff.n} seed{'s' if diff.n != 1 else ''}, {int(round((ci.confidence if ci else CONFIDENCE) * 100))}% bootstrap interval)"
    if diff.n < 2:
        return f"{change}: {what} {core} {tail}; one seed, no interval: no claim"
    if diff.detectable:
        direction = "raises" if diff.mean > 0 else "lowers"
        return f"{change} {direction} {what} by {core} {tail}"
    return f"{change}: no detectable difference in {what} ({core} {tail})"


def describe_correlation(corr: Correlation) -> str:
    """"rho = r [lo, hi] over n configurations (p = ...)" or "no detectable rank correlation (...)"."""
    if corr.rho is None:
        return f"{corr.x} vs {corr.y}: no rank correlation ({corr.note})"
    ci = corr.interval
    span = f" [{ci.low:+.2f}, {ci.high:+.2f}]" if ci is not None else ""
    core = f"rho = {corr.rho:+.2f}{span} over {corr.n} configurations, p = {corr.p_value:.2g}"
    if corr.detectable:
        return f"{corr.x} vs {corr.y}: {'positive' if corr.rho > 0 else 'negative'} rank correlation ({core})"
    return f"{corr.x} vs {corr.y}: no detectable rank correlation ({core})"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and math.isfinite(float(v))
