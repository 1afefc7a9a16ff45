from __future__ import annotations

import pytest

from tartarus.bench.stats import percentile, summary_ms


def test_p99_of_200_is_not_the_maximum() -> None:
    samples = [float(i) for i in range(1, 201)]
    assert percentile(samples, 99) == pytest.approx(198.01)
    assert percentile(samples, 99) < max(samples)


def test_matches_linear_interpolation() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 99) == 5.0
    assert percentile([3.0, 1.0, 2.0], 0) == 1.0
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0


def test_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_in_milliseconds() -> None:
    s = summary_ms([0.001] * 10)
    assert s["samples"] == 10 and s["p50_ms"] == 1.0 and s["max_ms"] == 1.0


def test_summary_keeps_every_sample_in_order() -> None:
    s = summary_ms([0.003, 0.001, 0.002])
    assert s["values_ms"] == [3.0, 1.0, 2.0] and s["p50_ms"] == 2.0
