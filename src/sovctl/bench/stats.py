"""Small statistics shared by the benchmarks: mean, sample standard deviation, percentiles."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def stdev(xs: Sequence[float]) -> float:
    """Sample standard deviation (n - 1), as llama-bench reports it; 0 for fewer than two."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, numpy's default method."""
    if not xs:
        return 0.0
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    """Distribution of one latency figure, in seconds."""

    n: int
    mean: float
    median: float
    p95: float
    p99: float
    max: float


def summarise(xs: Sequence[float]) -> Summary | None:
    if not xs:
        return None
    return Summary(
        n=len(xs),
        mean=mean(xs),
        median=percentile(xs, 50),
        p95=percentile(xs, 95),
        p99=percentile(xs, 99),
        max=max(xs),
    )
