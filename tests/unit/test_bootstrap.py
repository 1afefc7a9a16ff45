from __future__ import annotations

import random

import pytest

from tartarus.bench.bootstrap import p99, ratio_ci


def _run(seed: int, n: int, scale: float = 1.0) -> list[float]:
    rng = random.Random(seed)
    return [scale * rng.lognormvariate(4.5, 0.2) for _ in range(n)]  # ~90 ms, right-skewed


def _runs(seed: int, runs: int, n: int, scale: float = 1.0) -> list[list[float]]:
    return [_run(seed * 100 + r, n, scale) for r in range(runs)]


def test_twice_as_slow_gives_an_interval_around_two_that_excludes_one() -> None:
    ci = ratio_ci([_run(1, 100)], [_run(2, 100, scale=2.0)])
    assert 1.7 < ci.low < ci.ratio < ci.high < 2.4 and ci.low < 2 < ci.high
    assert ci.verdict == "B slower"
    assert (ci.n_a, ci.n_b, ci.runs_a, ci.runs_b) == (100, 100, 1, 1)
    assert (ci.resamples, ci.confidence) == (2000, 0.95)


def test_twice_as_slow_over_several_runs() -> None:
    ci = ratio_ci(_runs(1, 5, 20), _runs(2, 5, 20, scale=2.0))
    assert ci.low > 1 and ci.low < 2 < ci.high
    assert (ci.n_a, ci.runs_a) == (100, 5)


def test_twice_as_fast_is_shown_as_faster() -> None:
    ci = ratio_ci([_run(3, 60)], [_run(4, 60, scale=0.5)])
    assert ci.high < 1 and ci.verdict == "B faster"


def test_identical_distributions_give_an_interval_containing_one() -> None:
    ci = ratio_ci(_runs(5, 5, 40), _runs(6, 5, 40))
    assert ci.low < 1 < ci.high
    assert ci.verdict == "no difference shown"


def test_run_to_run_noise_widens_the_interval() -> None:
    """Runs that differ by a per-run offset: the same samples as one run would look conclusive."""
    offsets = [0.8, 1.25, 0.9, 1.2, 1.0]
    a = [[v * o for v in _run(10 + i, 40)] for i, o in enumerate(offsets)]
    b = [[v * o for v in _run(20 + i, 40)] for i, o in enumerate(reversed(offsets))]
    pooled = ratio_ci([[v for run in a for v in run]], [[v for run in b for v in run]])
    by_run = ratio_ci(a, b)
    assert by_run.high - by_run.low > pooled.high - pooled.low


def test_seeded_and_so_reproducible() -> None:
    a, b = [_run(7, 50)], [_run(8, 50)]
    assert ratio_ci(a, b, seed=3) == ratio_ci(a, b, seed=3)
    assert ratio_ci(a, b, seed=3) != ratio_ci(a, b, seed=4)


def test_ratio_of_p99_uses_the_given_statistic() -> None:
    a = [float(i) for i in range(1, 201)]
    ci = ratio_ci([a], [[2 * v for v in a]], statistic=p99, resamples=200)
    assert ci.ratio == pytest.approx(2.0)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        ratio_ci([], [[1.0]])
    with pytest.raises(ValueError):
        ratio_ci([[1.0], []], [[1.0]])
    with pytest.raises(ValueError):
        ratio_ci([[1.0]], [[1.0]], confidence=1.0)
    with pytest.raises(ValueError):
        ratio_ci([[0.0, 0.0]], [[1.0]])
