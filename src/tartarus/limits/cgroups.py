"""Per-sandbox cgroups on the VMM process: v2 where the host has a unified hierarchy with the
controllers, v1 (cpu, memory, pids, and cpuacct for accounting) otherwise.

The VMM joins them between fork and exec (runtime/vm.py), so not one guest instruction runs outside;
a gVisor sandbox's `runsc create` joins them before it runs (gvisor/containment.py), with an `Overhead`
of its own.
Memory is the guest's RAM plus the VMM's own overhead (the TCG translation cache on hosts without KVM);
CPU is a CFS quota of one CPU per vCPU; pids bounds the VMM's threads. Quarantine clamps CPU and stops
memory growth *without* killing: v1 turns the OOM killer off for the group (tasks wait instead),
v2 uses memory.high (throttling) rather than memory.max.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tartarus.errors import SandboxFailed
from tartarus.limits.spec import Limits

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
GROUP = "tartarus"
V1_CONTROLLERS = ("cpu", "memory", "pids", "cpuacct")  # cpuacct: accounting only
PERIOD_US = 100_000
VMM_THREADS = 64  # QEMU's own threads: vCPUs, I/O, RCU, workers
_MIB = 1 << 20


def vmm_overhead_mib() -> int:
    """Host memory a VMM uses beyond guest RAM (TCG's 128 MiB translation cache dominates)."""
    return 320


@dataclass(frozen=True)
class Overhead:
    """What the host side of a sandbox needs beyond what its limits give the guest: memory on top of
    the guest's, and a task count per vCPU on top of a fixed one. A VMM and a gVisor sandbox differ."""

    memory_mib: int
    tasks: int
    tasks_per_vcpu: int = 1

    def memory_limit_mib(self, limits: Limits) -> int:
        return limits.memory_mib + self.memory_mib

    def task_limit(self, limits: Limits) -> int:
        return self.tasks + self.tasks_per_vcpu * limits.vcpus


VMM = Overhead(vmm_overhead_mib(), VMM_THREADS)


def is_v2() -> bool:
    """A pure v2 host: the root has cgroup.controllers listing what we need."""
    controllers = ROOT / "cgroup.controllers"
    if not controllers.exists():
        return False
    have = set(controllers.read_text().split())
    return {"cpu", "memory", "pids"} <= have


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise SandboxFailed(f"cgroup: cannot write {value!r} to {path}: {e.strerror}") from e


@dataclass
class SandboxCgroup:
    name: str
    v2: bool
    paths: list[Path]
    limits: Limits | None = None
    overhead: Overhead = VMM

    @classmethod
    def create(cls, name: str, limits: Limits, overhead: Overhead = VMM) -> SandboxCgroup:
        v2 = is_v2()
        if v2:
            parent = ROOT / GROUP
            parent.mkdir(exist_ok=True)
            _write(parent / "cgroup.subtree_control", "+cpu +memory +pids")
            paths = [parent / name]
        else:
            paths = [ROOT / c / GROUP / name for c in V1_CONTROLLERS]
        group = cls(name, v2, [], overhead=overhead)
        try:
            for path in paths:
                path.mkdir(parents=True, exist_ok=True)
                group.paths.append(path)
            group.resize(limits)
        except BaseException:
            group.destroy()
            raise
        return group

    @classmethod
    def existing(cls, name: str, limits: Limits | None, overhead: Overhead = VMM) -> SandboxCgroup:
        """The group an earlier daemon made (taking over a running sandbox); `limits` are its own."""
        v2 = is_v2()
        paths = [ROOT / GROUP / name] if v2 else [ROOT / c / GROUP / name for c in V1_CONTROLLERS]
        if not all(p.is_dir() for p in paths):
            raise SandboxFailed(f"the cgroup of {name} is gone")
        return cls(name, v2, paths, limits, overhead)

    def resize(self, limits: Limits) -> None:
        """Apply `limits` (a pooled VMM's group was made with the template's; most creates match)."""
        if self.limits is not None and (self.limits.vcpus, self.limits.memory_mib) == (
            limits.vcpus,
            limits.memory_mib,
        ):
            self.limits = limits
            return
        self.set(limits.vcpus * PERIOD_US, self.overhead.memory_limit_mib(limits))
        self._set_pids(self.overhead.task_limit(limits))
        self.limits = limits

    def add(self, pid: int) -> None:
        """Move a running process (all its threads) into the group."""
        for path in self.paths:
            _write(path / "cgroup.procs", str(pid))

    def _path(self, controller: str) -> Path:
        if self.v2:
            return self.paths[0]
        return self.paths[V1_CONTROLLERS.index(controller)]

    def set(self, cpu_quota_us: int, memory_mib: int) -> None:
        if self.v2:
            _write(self._path("cpu") / "cpu.max", f"{cpu_quota_us} {PERIOD_US}")
            _write(self._path("memory") / "memory.max", str(memory_mib * _MIB))
        else:
            _write(self._path("cpu") / "cpu.cfs_period_us", str(PERIOD_US))
            _write(self._path("cpu") / "cpu.cfs_quota_us", str(cpu_quota_us))
            _write(self._path("memory") / "memory.limit_in_bytes", str(memory_mib * _MIB))

    def _set_pids(self, n: int) -> None:
        _write(self._path("pids") / "pids.max", str(n))

    def cpu_seconds(self) -> float:
        """CPU time the VMM has used (for metrics and runtime triggers)."""
        if self.v2:
            stat = (self._path("cpu") / "cpu.stat").read_text()
            return int(stat.split("usage_usec", 1)[1].split()[0]) / 1e6
        return int((self._path("cpuacct") / "cpuacct.usage").read_text()) / 1e9

    def memory_usage(self) -> int:
        name = "memory.current" if self.v2 else "memory.usage_in_bytes"
        return int((self._path("memory") / name).read_text())

    def clamp(self, cpu_fraction: float, memory_mib: int) -> None:
        """Quarantine: CPU cut to `cpu_fraction` of one CPU; memory may not grow past
        max(current use, memory_mib). Nothing is killed: the guest keeps its state for inspection."""
        quota = max(1000, int(PERIOD_US * cpu_fraction))
        usage_mib = -(-self.memory_usage() // _MIB)
        ceiling = max(usage_mib + 1, memory_mib)
        if self.v2:
            _write(self._path("cpu") / "cpu.max", f"{quota} {PERIOD_US}")
            _write(self._path("memory") / "memory.high", str(ceiling * _MIB))
        else:
            _write(self._path("cpu") / "cpu.cfs_quota_us", str(quota))
            _write(self._path("memory") / "memory.oom_control", "1")
            with contextlib.suppress(SandboxFailed):  # below a limit already lower: keep that one
                _write(self._path("memory") / "memory.limit_in_bytes", str(ceiling * _MIB))

    def release(self, limits: Limits) -> None:
        """Undo `clamp`."""
        if self.v2:
            _write(self._path("memory") / "memory.high", "max")
        else:
            _write(self._path("memory") / "memory.oom_control", "0")
        self.set(limits.vcpus * PERIOD_US, self.overhead.memory_limit_mib(limits))

    def pids_events_max(self) -> int:
        """How often the VMM hit its thread limit (a runtime-trigger signal)."""
        if self.v2:
            for line in (self._path("pids") / "pids.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "max":
                    return int(value)
            return 0
        return 0

    def destroy(self) -> None:
        for path in self.paths:
            _rmdir(path)
        self.paths = []


def _rmdir(path: Path, timeout: float = 2.0) -> None:
    """rmdir a cgroup; the kernel refuses (EBUSY) while an exiting VMM is still being torn down."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if time.monotonic() > deadline:
                log.warning("cannot remove cgroup %s: %s", path, e.strerror)
                return
            time.sleep(0.01)


def reap(name: str) -> None:
    """Remove a dead sandbox's cgroups (whatever the hierarchy)."""
    candidates = [ROOT / GROUP / name] + [ROOT / c / GROUP / name for c in V1_CONTROLLERS]
    for path in candidates:
        if path.is_dir():
            _rmdir(path)


__all__ = ["VMM", "Overhead", "SandboxCgroup", "is_v2", "reap"]
