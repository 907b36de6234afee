"""The confidence intervals of xfer.experiments.stats match scipy's t tests and a hand computation.

Tolerances: everything here is float64 arithmetic on a handful of values of order 1 (a mean, a
sample std, one t quantile from scipy.stats.t.ppf in both paths), so the two computations differ
only by rounding in the last few bits; rel=1e-12 (about 4500 ulps) leaves room for the different
summation orders of numpy and scipy and still fails on any formula error (ddof 0 vs 1, a one-sided
quantile, n instead of n − 1 degrees of freedom: each changes the interval by > 1e-2 relative).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from xfer.experiments import stats

REL = 1e-12


def test_mean_ci_by_hand():
    # [0.80, 0.82, 0.84]: mean 0.82, sample std 0.02, t_{0.975, 2} = 4.302652729749464.
    interval = stats.mean_ci([0.80, 0.82, 0.84])
    half = 4.302652729749464 * 0.02 / math.sqrt(3)
    assert interval.n == 3
    assert interval.mean == pytest.approx(0.82, rel=REL)
    assert interval.std == pytest.approx(0.02, rel=REL)
    assert interval.low == pytest.approx(0.82 - half, rel=REL)
    assert interval.high == pytest.approx(0.82 + half, rel=REL)
    assert interval.half_width == pytest.approx(half, rel=REL)
    assert stats.t_critical(3) == pytest.approx(4.302652729749464, rel=REL)


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("values", [
    [0.912, 0.905, 0.921],
    [0.5, 0.61, 0.58, 0.49, 0.66],
    [0.0, 1.0],
])
def test_mean_ci_matches_scipy_ttest_1samp(values, confidence):
    interval = stats.mean_ci(values, confidence)
    expected = scipy_stats.ttest_1samp(values, 0.0).confidence_interval(confidence)
    assert interval.mean == pytest.approx(np.mean(values), rel=REL)
    assert interval.std == pytest.approx(np.std(values, ddof=1), rel=REL)
    assert interval.low == pytest.approx(expected.low, rel=REL)
    assert interval.high == pytest.approx(expected.high, rel=REL)


@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_paired_difference_matches_scipy_ttest_rel(confidence):
    values = [0.931, 0.925, 0.940, 0.929]
    baseline = [0.910, 0.915, 0.918, 0.902]
    interval = stats.paired_difference(values, baseline, confidence)
    expected = scipy_stats.ttest_rel(values, baseline).confidence_interval(confidence)
    differences = np.subtract(values, baseline)
    assert interval.n == 4
    assert interval.mean == pytest.approx(differences.mean(), rel=REL)
    assert interval.low == pytest.approx(expected.low, rel=REL)
    assert interval.high == pytest.approx(expected.high, rel=REL)
    assert interval.excludes(0.0) is True  # every seed improves: the interval lies above 0


def test_paired_difference_is_narrower_than_unpaired_when_seeds_share_their_effect():
    # Each seed moves both methods alike; the per-seed difference is nearly constant.
    baseline = [0.80, 0.85, 0.90]
    values = [0.81, 0.86, 0.91]
    paired = stats.paired_difference(values, baseline)
    assert paired.mean == pytest.approx(0.01, rel=1e-9)  # 0.81 − 0.80 etc. are not exact in binary
    assert paired.half_width < 1e-9 < stats.mean_ci(values).half_width


def test_an_interval_around_zero_does_not_exclude_it():
    interval = stats.paired_difference([0.90, 0.92, 0.91], [0.91, 0.90, 0.91])
    assert interval.low < 0 < interval.high
    assert interval.excludes(0.0) is False
    assert stats.mean_ci([-0.3, -0.2, -0.25]).excludes(0.0) is True  # an interval below 0 excludes it too


def test_one_value_has_no_interval():
    interval = stats.mean_ci([0.7])
    assert interval == stats.Interval(n=1, mean=0.7, std=None, low=None, high=None)
    assert interval.half_width is None
    assert interval.excludes(0.0) is None  # cannot say, rather than a NaN comparison's False
    paired = stats.paired_difference([0.7], [0.6])
    assert paired.n == 1 and paired.std is None and paired.low is None and paired.high is None
    assert paired.mean == pytest.approx(0.1, rel=1e-12)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="aligned by seed"):
        stats.paired_difference([0.9, 0.91, 0.92], [0.9, 0.91])


@pytest.mark.parametrize("values", [[], [0.9, float("nan")], [[0.9, 0.8]]])
def test_bad_values_raise(values):
    with pytest.raises(ValueError):
        stats.mean_ci(values)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 95])
def test_bad_confidence_raises(confidence):
    with pytest.raises(ValueError, match="confidence"):
        stats.mean_ci([0.1, 0.2], confidence)
