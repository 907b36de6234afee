"""Confidence intervals over seeds: what an ablation table can honestly claim from a few runs.

A fine-tuning method's accuracy varies with the seed, so a result is a mean over n seeds with a
Student-t confidence interval, `mean ± t_{(1+c)/2, n-1} · s / √n` (s the sample standard deviation,
ddof = 1). Two methods run with the same seeds share each seed's data order and initialisation, so
their comparison is the interval of the per-seed differences (a paired t interval), which is narrower
than comparing two separate intervals whenever the seeds' effects are shared.

With n = 1 there is no spread to estimate: the interval's std, low and high are None (not NaN), and
`Interval.excludes` answers None, "cannot say". With n = 3 the critical value t_{0.975, 2} is 4.30,
so intervals are wide; `t_critical` gives it for a caption.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
from scipy import stats as scipy_stats


class Interval(NamedTuple):
    """A mean over n values and its confidence interval; std, low and high are None when n == 1."""

    n: int
    mean: float
    std: float | None  # sample standard deviation (ddof = 1)
    low: float | None
    high: float | None

    @property
    def half_width(self) -> float | None:
        """(high − low) / 2: the error bar; None when n == 1."""
        return None if self.low is None else (self.high - self.low) / 2

    def excludes(self, value: float = 0.0) -> bool | None:
        """Whether `value` lies outside the closed interval; None when there is no interval (n == 1)."""
        if self.low is None:
            return None
        return value < self.low or value > self.high


def t_critical(n: int, confidence: float = 0.95) -> float:
    """The two-sided Student-t critical value for n values: t_{(1+c)/2, n-1}; 4.3027 for n = 3, c = 0.95."""
    if n < 2:
        raise ValueError(f"a t interval needs n >= 2 values, got n = {n}")
    _check_confidence(confidence)
    return float(scipy_stats.t.ppf((1 + confidence) / 2, n - 1))


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of `values` and its Student-t interval at `confidence` (two-sided).

    Raises ValueError for no values or a non-finite one (a NaN accuracy is a bug to surface, not to
    average). All arithmetic is float64.
    """
    _check_confidence(confidence)
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"mean_ci needs a non-empty 1-D sequence of values, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"mean_ci got a non-finite value: {x.tolist()}")
    n, mean = int(x.size), float(np.mean(x))
    if n == 1:
        return Interval(n=1, mean=mean, std=None, low=None, high=None)
    std = float(np.std(x, ddof=1))
    half = t_critical(n, confidence) * std / math.sqrt(n)
    return Interval(n=n, mean=mean, std=std, low=mean - half, high=mean + half)


def paired_difference(values: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> Interval:
    """The interval of values[i] − baseline[i]: a paired t interval over the same seeds.

    The caller aligns both sequences by seed (element i of each is seed i's run); a length mismatch
    raises ValueError rather than silently pairing different seeds.
    """
    values, baseline = list(values), list(baseline)
    if len(values) != len(baseline):
        raise ValueError(f"paired_difference needs values aligned by seed: {len(values)} values "
                         f"against {len(baseline)} baseline values")
    differences = np.asarray(values, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    return mean_ci(differences, confidence)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
