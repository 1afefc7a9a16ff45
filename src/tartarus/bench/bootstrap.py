"""How much slower B is than A, with a confidence interval: a ratio of statistics, bootstrapped.

A regression shows as "B/A = 1.12 [1.05, 1.19]" rather than as two noisy absolute numbers. Samples come
in runs (one benchmark process each), and samples of one run share its conditions — load from other
tenants, where the VMs landed — so they are not independent: the bootstrap is two-level (runs with
replacement, then samples within each chosen run), which keeps run-to-run noise in the interval instead
of pretending n samples are n independent draws. Percentile bootstrap, seeded: the same samples always
give the same interval. Pure Python: no numpy in the benchmark path.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tartarus.bench.stats import percentile

Statistic = Callable[[Sequence[float]], float]
Runs = Sequence[Sequence[float]]


def median(samples: Sequence[float]) -> float:
    return percentile(samples, 50)


def p99(samples: Sequence[float]) -> float:
    return percentile(samples, 99)


@dataclass(frozen=True)
class RatioCI:
    """stat(B) / stat(A), and the bootstrap interval around it at `confidence`."""

    ratio: float
    low: float
    high: float
    confidence: float
    resamples: int
    n_a: int
    n_b: int
    runs_a: int
    runs_b: int

    @property
    def verdict(self) -> str:
        if self.low > 1:
            return "B slower"
        if self.high < 1:
            return "B faster"
        return "no difference shown"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


def _flat(runs: Runs) -> list[float]:
    return [v for run in runs for v in run]


def _resample(runs: Runs, rng: random.Random) -> list[float]:
    chosen = rng.choices(runs, k=len(runs))
    return [v for run in chosen for v in rng.choices(run, k=len(run))]


def ratio_ci(
    a: Runs,
    b: Runs,
    statistic: Statistic = median,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> RatioCI:
    """stat(B)/stat(A) over all samples, with a two-level percentile-bootstrap interval.

    `a` and `b` are the samples of each run of each side; one run per side is plain bootstrap."""
    flat_a, flat_b = _flat(a), _flat(b)
    if not flat_a or not flat_b or any(not run for run in (*a, *b)):
        raise ValueError("every run of both sides needs samples")
    if not 0 < confidence < 1:
        raise ValueError("confidence must be within (0, 1)")
    if resamples < 1:
        raise ValueError("resamples must be positive")
    base = statistic(flat_a)
    if base <= 0 or min(flat_a) < 0 or min(flat_b) < 0:
        raise ValueError("a ratio needs positive samples")
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        ra = statistic(_resample(a, rng))
        rb = statistic(_resample(b, rng))
        ratios.append(rb / ra if ra > 0 else float("inf"))
    tail = (1 - confidence) / 2 * 100
    return RatioCI(
        ratio=statistic(flat_b) / base,
        low=percentile(ratios, tail),
        high=percentile(ratios, 100 - tail),
        confidence=confidence,
        resamples=resamples,
        n_a=len(flat_a),
        n_b=len(flat_b),
        runs_a=len(a),
        runs_b=len(b),
    )
