"""Helpers for tests of the ready pool (`snapshots.ready`): its metrics, read from a real daemon."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from tartarus.sdk.sync import Client
from tests.conftest import wait_until


@dataclass(frozen=True)
class ReadyMetrics:
    size: int
    hits: int
    misses: int


def ready_metrics(url: str) -> ReadyMetrics:
    with Client(url) as client:
        text = client.request("GET", "/metrics").text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return ReadyMetrics(
        int(values["tartarus_ready_sandboxes"]),
        int(values["tartarus_ready_pool_hits_total"]),
        int(values["tartarus_ready_pool_misses_total"]),
    )


def wait_ready(url: str, size: int, timeout: float = 180) -> ReadyMetrics:
    """Wait until the daemon's ready pools hold `size` sandboxes; their metrics then."""
    assert wait_until(lambda: ready_metrics(url).size == size, timeout), "the ready pool never filled"
    return ready_metrics(url)
