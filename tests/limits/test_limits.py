"""Limits on real VMs: the TTL fires on time; a fork bomb and a memory hog stay inside their sandbox."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from pathlib import Path

import pytest

from tartarus import audit
from tartarus.errors import NotFound
from tartarus.sdk import Sandbox

pytestmark = pytest.mark.vm

BOUNDED_BOMB = """
import os, signal, time
pids = []
while len(pids) < 100000:
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    pids.append(pid)
for pid in pids:
    os.kill(pid, signal.SIGKILL)
print(len(pids))
"""

FORK_BOMB = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""

MEMORY_HOG = """
chunks = []
while True:
    chunks.append(bytearray(64 << 20))  # touched: bytearray zero-fills
"""


def test_ttl_destroys_on_time_and_says_why(daemon_url: str, daemon_state: Path) -> None:
    sb = Sandbox.create("python-ds", url=daemon_url, timeout=2)
    created = sb.info["created_at"]
    assert sb.info["expires_at"] == pytest.approx(created + 2)
    while True:
        try:
            sb.refresh()
        except NotFound as e:
            gone = time.time()
            assert "timeout of 2 s expired" in str(e)
            break
        assert time.time() - created < 10, "TTL did not fire"
        time.sleep(0.05)  # polling the API for the daemon's timer; nothing to wait on
    assert 2.0 <= gone - created < 3.0
    expired = [r for r in audit.read(daemon_state) if r["action"] == "sandbox.expired"]
    assert any(r["sandbox"] == sb.id for r in expired)


def test_guest_process_cap_stops_a_fork_bomb(daemon_url: str) -> None:
    with Sandbox.create("python-ds", url=daemon_url, max_processes=150) as sb:
        result = sb.commands.run(["python3", "-c", BOUNDED_BOMB], timeout=120)
        assert result.exit_code == 0, result.stderr
        forked = int(result.stdout)
        assert 0 < forked < 150  # the guest's own tasks (agent, interpreter, kthreads) count too
        assert sb.run_code("1+1").result == "2"  # and the guest is fine afterwards


def _cpu_seconds(sandbox_id: str) -> float:
    """CPU time of a sandbox's VMM, from its cgroup (v1 cpuacct or v2 cpu.stat)."""
    v1 = Path(f"/sys/fs/cgroup/cpuacct/tartarus/{sandbox_id}/cpuacct.usage")
    if v1.exists():
        return int(v1.read_text()) / 1e9
    stat = Path(f"/sys/fs/cgroup/tartarus/{sandbox_id}/cpu.stat").read_text()
    return int(stat.split("usage_usec", 1)[1].split()[0]) / 1e6


def _latency(sb: Sandbox, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        assert sb.run_code("sum(range(20000))").result == "199990000"
        times.append(time.perf_counter() - t0)
    return times


def test_fork_bomb_and_memory_hog_leave_the_neighbour_answering(daemon_url: str) -> None:
    with (
        Sandbox.create("python-ds", url=daemon_url) as neighbour,
        Sandbox.create("python-ds", url=daemon_url, max_processes=300) as hostile,
    ):
        _latency(neighbour, 3)  # warm the path
        baseline = statistics.median(_latency(neighbour, 10))
        hog = hostile.commands.run(["python3", "-c", MEMORY_HOG], timeout=120)
        assert hog.exit_code != 0  # the guest's OOM killer or MemoryError ended it, not the host
        assert hostile.run_code("1+1").result == "2"  # the hostile sandbox's VMM survived its guest

        def bomb() -> None:
            # The guest may be too busy to report back; the neighbour is what is measured.
            with contextlib.suppress(Exception):
                hostile.commands.run(["timeout", "20", "python3", "-c", FORK_BOMB], timeout=60)

        cpu_used = _cpu_seconds(hostile.id)
        thread = threading.Thread(target=bomb, daemon=True)
        thread.start()
        # Measure once the bomb has burnt a full second of CPU in the hostile VMM's cgroup.
        deadline = time.monotonic() + 30
        while _cpu_seconds(hostile.id) < cpu_used + 1.0:
            assert time.monotonic() < deadline, "the fork bomb never ran"
            time.sleep(0.05)
        during = statistics.median(_latency(neighbour, 10))
        thread.join(90)
        print(f"neighbour run_code median: {baseline * 1000:.1f} ms before, {during * 1000:.1f} ms during")
        assert during < max(4 * baseline, baseline + 0.5)
