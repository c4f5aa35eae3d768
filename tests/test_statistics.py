"""The standard errors the evaluations, the report and the benches quote, and when a gap counts."""

from __future__ import annotations

import statistics

import pytest

from lit_sftrl.core.statistics import Gap, binomial_stderr, mean_and_stderr


def test_mean_and_stderr_over_seeds_is_the_sample_deviation_over_root_n():
    values = [0.2, 0.25, 0.4]
    mean, stderr = mean_and_stderr(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert stderr == pytest.approx(statistics.stdev(values) / len(values) ** 0.5)
    assert mean_and_stderr([0.3]) == (0.3, 0.0)  # one seed: no spread to measure
    with pytest.raises(ValueError, match="no values"):
        mean_and_stderr([])


def test_binomial_stderr():
    assert binomial_stderr(0.25, 48) == pytest.approx((0.25 * 0.75 / 48) ** 0.5)
    assert binomial_stderr(0.0, 10) == binomial_stderr(0.5, 0) == 0.0


def test_a_gap_counts_beyond_twice_the_two_standard_errors_together():
    gap = Gap.between(0.32, 0.02, 0.20, 0.02)  # 12 points, standard error sqrt(2² + 2²) = 2.83
    assert gap.difference == pytest.approx(0.12) and gap.stderr == pytest.approx(0.0283, abs=1e-4)
    assert gap.beyond_two_stderr and gap.as_dict()["beyond_two_stderr"]
    assert not Gap.between(0.25, 0.02, 0.20, 0.02).beyond_two_stderr  # 5 points < 2 x 2.83
    assert not Gap.between(0.0, 0.0, 0.0, 0.0).beyond_two_stderr  # nobody scores: no gap
    assert not Gap.between(0.10, 0.0, 0.20, 0.0).beyond_two_stderr  # a gap the wrong way
