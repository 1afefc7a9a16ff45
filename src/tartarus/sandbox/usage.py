"""What a running sandbox uses now, for `GET /v1/sandboxes/{id}/metrics` (and E2B's metrics).

CPU is the VMM process's own time (all its threads: under TCG the emulation is the sandbox's cost), as a
percentage of the sandbox's vCPUs over the window since the previous reading, or since the VMM started;
a gVisor sandbox's is its cgroup's (runsc's processes). Memory is the guest kernel's own view
(/proc/meminfo, read through the agent; gVisor's Sentry reports the host's total, so its limit is given
instead). Disk is the host's view of the sandbox's writable layer: bytes allocated of its size.
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from pathlib import Path

from tartarus.errors import SandboxFailed
from tartarus.sandbox.capture import LAYER
from tartarus.sandbox.sandbox import Sandbox
from tartarus.wire import SandboxMetrics

TICKS = os.sysconf("SC_CLK_TCK")
WINDOW_MAX_S = 60.0  # an older previous reading is stale: fall back to the VMM's whole life


# Per sandbox: (monotonic time, CPU seconds) of its previous reading.
_previous: weakref.WeakKeyDictionary[Sandbox, tuple[float, float]] = weakref.WeakKeyDictionary()


def process_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds the process used, seconds since it started), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    used = (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return used, uptime - int(fields[19]) / TICKS  # starttime


def meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo's fields, in bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def overlay_bytes(pid: int | None, layer: Path) -> int:
    """Bytes allocated to a gVisor sandbox's writable layer: runsc's overlay file in `layer`, which it
    unlinks once open, so it is found through the sandbox process's descriptors."""
    if pid is None:
        return 0
    fds = Path(f"/proc/{pid}/fd")
    total = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(fds):
            with contextlib.suppress(OSError):
                if os.readlink(fds / fd).startswith(f"{layer}/"):
                    total += os.stat(fds / fd).st_blocks * 512
    return total


async def measure(sandbox: Sandbox) -> SandboxMetrics:
    agent = sandbox.agent  # raises if the sandbox is not running
    now, mono = time.time(), time.monotonic()
    vm, container, limits = sandbox.vm, sandbox.container, sandbox.limits
    if container is not None:
        # gVisor's guest runs in runsc's sandbox, gofer and stub processes: its cgroup counts them all.
        if sandbox.cgroup is None or limits is None:
            raise SandboxFailed(f"sandbox {sandbox.id} has no cgroup to measure")
        cpu, lifetime, vcpus = sandbox.cgroup.cpu_seconds(), now - sandbox.created_at, limits.vcpus
        # runsc's overlay file; the size is the nominal disk_mib (runsc sets none: it is not enforced).
        disk_used, disk_total = overlay_bytes(container.pid, container.paths.layer), limits.disk_mib << 20
    elif vm is None or vm.pid is None:
        raise SandboxFailed(f"sandbox {sandbox.id} is not running")
    else:
        (cpu, lifetime), vcpus = process_cpu(vm.pid), vm.config.vcpus
        layer = os.stat(sandbox.workdir / LAYER)
        disk_used, disk_total = layer.st_blocks * 512, layer.st_size
    previous = _previous.get(sandbox)
    if previous is not None and 0 < mono - previous[0] <= WINDOW_MAX_S:
        used, window = cpu - previous[1], mono - previous[0]
    else:
        used, window = cpu, lifetime
    _previous[sandbox] = (mono, cpu)
    pct = min(100.0, max(0.0, 100.0 * used / (window * vcpus))) if window > 0 else 0.0
    text = b"".join([chunk async for chunk in await agent.read_file("/proc/meminfo")])
    memory = meminfo(text.decode("ascii", "replace"))
    total = memory.get("MemTotal", 0)
    used_memory = max(0, total - memory.get("MemAvailable", total))
    if container is not None and limits is not None:  # the Sentry's MemTotal is the host's
        total = limits.memory_mib << 20
    return SandboxMetrics(
        timestamp=now,
        cpu_count=vcpus,
        cpu_used_pct=round(pct, 2),
        mem_used_bytes=used_memory,
        mem_total_bytes=total,
        mem_cache_bytes=memory.get("Cached", 0),
        disk_used_bytes=disk_used,
        disk_total_bytes=disk_total,
    )
