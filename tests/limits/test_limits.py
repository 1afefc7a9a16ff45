"""Limits on real VMs: the TTL fires on time; a fork bomb and a memory hog stay inside their sandbox."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from pathlib import Path

import pytest

from tartarus import audit
from tartarus.errors import InvalidArgument, NotFound
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
    """Expiry happens, and never before its time; how late it may be is generous here (a slow machine
    must not fail it)."""
    sb = Sandbox.create("python-ds", url=daemon_url, timeout=2)
    created = sb.info.created_at
    assert sb.info.expires_at == pytest.approx(created + 2)
    while True:
        try:
            sb.refresh()
        except NotFound as e:
            assert "timeout of 2 s expired" in str(e)
            break
        assert time.time() - created < 60, "TTL did not fire"
        time.sleep(0.05)  # polling the API for the daemon's timer; nothing to wait on
    (expired,) = [
        r for r in audit.read(daemon_state) if r["action"] == "sandbox.expired" and r["sandbox"] == sb.id
    ]
    assert expired["ts"] >= created + 2.0, f"expired {expired['ts'] - created:.3f} s after creation"


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


FILL = """
import os
def _fill(path, size):
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)  # blocks allocated for real, without writing them
        return "ok"
    except OSError as e:
        return os.strerror(e.errno)
    finally:
        os.close(fd)
"""


def _disk_mib(sb: Sandbox) -> int:
    return int(sb.run_code("import os; _s = os.statvfs('/'); _s.f_blocks * _s.f_frsize >> 20").result or 0)


def test_disk_size_is_what_was_asked_and_survives_hibernation(daemon_url: str) -> None:
    """A bigger disk holds more than the default one can (5 GiB allocated in a 4 GiB layer fails), and
    keeps its size and contents through a hibernation."""
    with Sandbox.create("python-ds", url=daemon_url) as small:
        assert 3900 < _disk_mib(small) <= 4096
        small.run_code(FILL)
        assert small.run_code("_fill('/root/big', 5 << 30)").result == "'No space left on device'"
    with pytest.raises(InvalidArgument, match="disk_mib=32768 is over this host's policy limit of 16384"):
        Sandbox.create("python-ds", url=daemon_url, disk_mib=32768)
    with Sandbox.create("python-ds", url=daemon_url, disk_mib=8192) as big:
        assert 7900 < _disk_mib(big) <= 8192
        big.run_code(FILL)
        assert big.run_code("_fill('/root/big', 5 << 30)").result == "'ok'"
        assert big.hibernate().state == "hibernated"
        assert 7900 < _disk_mib(big) <= 8192
        assert big.run_code("os.path.getsize('/root/big') >> 30").result == "5"
