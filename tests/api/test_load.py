"""A short run of `tartarus bench load` (the 32-client, 3-minute version is the same command with defaults):
concurrent clients creating, executing in and destroying sandboxes end with no error and nothing leaked."""

from __future__ import annotations

import pytest

from tartarus.bench.load import run_load

pytestmark = pytest.mark.vm


def test_concurrent_clients_cycle_sandboxes_without_errors_or_leaks() -> None:
    result = run_load(clients=4, duration=12, pool_size=1)
    assert result["errors"] == 0, result["error_samples"]
    assert result["cycles"] >= 4
    assert result["sandboxes_left"] == 0
    assert result["vms_left_after_exit"] == 0
    # Memory does not run away (a leak per cycle would show over dozens of cycles).
    rss = result["daemon_rss_mib"]
    assert rss["late_median"] < rss["early_median"] + 50, rss
