"""The statistics every report uses, written once: the standard error of a mean, Student's t
interval over a few seeds, and the rule for "beyond noise".

- ``standard_error``: of the mean of per-item values (chunks, blocks, tasks, paired differences),
  from their sum, sum of squares and count, so that data-parallel replicas can add their sums
  first (``evaluation.sharding.mean_and_error``);
- ``t_interval``: the mean over seeds and the half-width of its two-sided 95% interval;
- ``NOISE_STANDARD_ERRORS``: a change counts as beyond noise when it exceeds this many standard
  errors.
"""

from __future__ import annotations

import math
import statistics

NOISE_STANDARD_ERRORS = 2.0

# Student's t, two-sided 95%, by degrees of freedom (seeds - 1); the normal's 1.96 beyond the table
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def standard_error_from_sums(total: float, squares: float, count: float) -> tuple[float, float]:
    """(mean, standard error of the mean) from the sum, the sum of squares and the count of values;
    NaN where there are too few (no value: both; one value: the error)."""
    if count == 0:
        return math.nan, math.nan
    mean = total / count
    if count < 2:
        return mean, math.nan
    variance = (squares - count * mean * mean) / (count - 1)
    return mean, math.sqrt(max(variance, 0.0) / count)


def standard_error(values) -> float:
    """The standard error of the mean of ``values`` (NaN for fewer than two)."""
    values = list(values)
    return standard_error_from_sums(math.fsum(values), math.fsum(v * v for v in values), len(values))[1]


def t_interval(values) -> tuple[float, float]:
    """(mean, half-width of its 95% interval, Student's t) over ``values`` (one per seed); the
    half-width is NaN for a single value."""
    values = list(values)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
