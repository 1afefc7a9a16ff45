"""The pure parts of a sandbox's usage readings and their E2B shape."""

from __future__ import annotations

import os

from tartarus.e2b.control import e2b_metrics
from tartarus.sandbox.usage import meminfo, process_cpu
from tartarus.wire import SandboxMetrics


def test_meminfo_is_read_in_bytes() -> None:
    text = "MemTotal:         504900 kB\nMemAvailable:     400000 kB\nHugePages_Total:       0\n"
    assert meminfo(text) == {"MemTotal": 504900 * 1024, "MemAvailable": 400000 * 1024, "HugePages_Total": 0}


def test_a_process_cpu_time_and_age_come_from_proc() -> None:
    used, age = process_cpu(os.getpid())
    total = os.times()
    assert 0 < used <= total.user + total.system + 0.05 and age > 0


def test_e2b_gets_its_metric_shape() -> None:
    view = SandboxMetrics(1796650000.5, 1, 12.5, 100, 500, 7, 10, 20)
    assert e2b_metrics(view) == {
        "timestamp": "2026-12-07T13:26:40.500000Z",
        "timestampUnix": 1796650000,
        "cpuCount": 1,
        "cpuUsedPct": 12.5,
        "memUsed": 100,
        "memTotal": 500,
        "memCache": 7,
        "diskUsed": 10,
        "diskTotal": 20,
    }
