"""Standard errors, and when a difference counts: one home for the statistics that evaluations, the study's
report and the benchmarks quote.

* ``binomial_stderr``: one model's rate over N episodes (or attempts): sqrt(p(1-p)/N).
* ``mean_and_stderr``: several seeds' values: their mean and the sample standard deviation / sqrt(seeds).
* ``Gap``: the difference of two estimates with the standard error of the difference, sqrt(se_a^2 + se_b^2)
  ("the two standard errors together"), and whether it exceeds twice that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def binomial_stderr(p: float, n: float) -> float:
    """sqrt(p(1-p)/N), 0 for an empty sample."""
    return math.sqrt(p * (1 - p) / n) if n > 0 else 0.0


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error over the values (sample standard deviation / sqrt(n); 0 for one value,
    where the spread is unknown, not zero: callers say which standard error they use instead)."""
    if not values:
        raise ValueError("mean_and_stderr: no values")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


@dataclass(frozen=True)
class Gap:
    """``a - b`` for two independent estimates, with the standard error of the difference."""

    difference: float
    stderr: float

    @classmethod
    def between(cls, a: float, a_stderr: float, b: float, b_stderr: float) -> Gap:
        return cls(a - b, math.hypot(a_stderr, b_stderr))

    @property
    def beyond_two_stderr(self) -> bool:
        """The difference exceeds twice its standard error (so is positive: a difference of 0 with standard error
        0, as between two models that both score 0, is not beyond)."""
        return self.difference > 2 * self.stderr

    def as_dict(self) -> dict[str, float | bool]:
        return {**asdict(self), "beyond_two_stderr": self.beyond_two_stderr}
