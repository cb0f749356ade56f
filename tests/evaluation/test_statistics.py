"""The one statistics module: values worked out by hand."""

import math

import pytest

from ebft_megatron.evaluation.statistics import (NOISE_STANDARD_ERRORS, standard_error, standard_error_from_sums,
                                                  t_interval)


def test_standard_error_of_a_mean():
    # 1, 2, 3, 4: sample variance 5/3, standard error sqrt(5/3 / 4)
    assert standard_error([1.0, 2.0, 3.0, 4.0]) == pytest.approx(math.sqrt(5 / 12), rel=1e-12)
    assert math.isnan(standard_error([2.0])) and math.isnan(standard_error([]))


def test_from_sums_as_replicas_add_them():
    # two replicas holding [1, 2] and [3, 4] add their sums: the same as all four together
    total, squares, count = 1 + 2 + 3 + 4, 1 + 4 + 9 + 16, 4
    assert standard_error_from_sums(total, squares, count) == pytest.approx((2.5, math.sqrt(5 / 12)), rel=1e-12)
    mean, error = standard_error_from_sums(3.0, 9.0, 1)
    assert mean == 3.0 and math.isnan(error)
    assert all(math.isnan(v) for v in standard_error_from_sums(0.0, 0.0, 0))


def test_t_interval_over_seeds():
    # 1, 2, 3: mean 2, sd 1, t(2 df) = 4.303
    mean, half = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3), rel=1e-12)
    mean, half = t_interval([5.0, 7.0])  # t(1 df) = 12.706, sd sqrt(2)
    assert mean == 6.0 and half == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2), rel=1e-12)
    assert math.isnan(t_interval([4.0])[1])


def test_the_noise_rule_is_two_standard_errors():
    assert NOISE_STANDARD_ERRORS == 2.0
