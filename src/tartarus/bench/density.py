"""`bench density`: how many idle python-ds sandboxes this machine holds, and what each costs the host.

In one run: a new sandbox's create → `run_code` latency on the empty machine; then sandboxes restored
one after another and left idle (after one `run_code`, as a user would leave them), measured at
checkpoints along the way (host memory of every VMM by what it holds, their CPU and wake-ups while
idle); then the same create → `run_code` latency again with all of them idle. The fill stops early when
less than a quarter of the host's memory is left, so the benchmark cannot take the host down.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tartarus.bench import vmm_memory
from tartarus.bench.stats import percentile, summary_ms
from tartarus.sandbox.sandbox import Sandbox
from tartarus.snapshots.build import ensure_snapshot
from tartarus.snapshots.snapshot import Snapshot
from tartarus.templates.built import Template, get_template

IDLE_WINDOW_S = 5.0
MIN_AVAILABLE_FRACTION = 0.25
CHECKPOINTS = (1, 10, 50, 100, 250, 500, 750, 1000)
TEARDOWN_CONCURRENCY = 8


def checkpoints(max_sandboxes: int) -> list[int]:
    """The counts at which the idle sandboxes are measured: a rough geometric series, and the last."""
    return sorted({n for n in CHECKPOINTS if n < max_sandboxes} | {max_sandboxes})


def _meminfo_kib(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/meminfo")


@dataclass(frozen=True)
class CpuUse:
    """What processes' threads ran, from schedstat: nanoseconds on a CPU and times scheduled in."""

    ns: int
    runs: int

    def __sub__(self, other: CpuUse) -> CpuUse:
        return CpuUse(self.ns - other.ns, self.runs - other.runs)


def cpu_use(pids: Sequence[int]) -> CpuUse:
    ns = runs = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
            except FileNotFoundError:
                continue
            ns += int(fields[0])
            runs += int(fields[2])
    return CpuUse(ns, runs)


def _host_busy_ticks() -> tuple[int, int]:
    """Busy and total jiffies of the whole host (every process's, not only ours), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass(frozen=True)
class IdleSample:
    sandboxes: int
    memory: vmm_memory.VmmMemory  # summed over every VMM
    cpu: CpuUse  # of every VMM over the window
    window_s: float
    host_busy_fraction: float  # of all the host's CPUs, whoever used them
    mem_available_kib: int

    def point(self) -> dict[str, float]:
        """One point of the curve, per idle sandbox."""
        n = self.sandboxes
        return {
            "sandboxes": n,
            "pss_mib_per_sandbox": round(self.memory.total.pss_kib / 1024 / n, 2),
            "private_mib_per_sandbox": round(self.memory.total.private_kib / 1024 / n, 2),
            "idle_cpu_percent_per_sandbox": round(100 * self.cpu.ns / 1e9 / self.window_s / n, 4),
            "idle_wakeups_per_s_per_sandbox": round(self.cpu.runs / self.window_s / n, 2),
            "host_cpu_busy_percent": round(100 * self.host_busy_fraction, 1),
            "mem_available_mib": round(self.mem_available_kib / 1024),
        }


def breakdown_mib(memory: vmm_memory.VmmMemory, n: int) -> dict[str, dict[str, float]]:
    """Per sandbox, by what the memory holds: PSS and private MiB (page tables: kernel memory)."""
    parts = {k: v for k, v in asdict(memory).items() if isinstance(v, dict)}
    out = {
        name: {"pss": round(u["pss_kib"] / 1024 / n, 2), "private": round(u["private_kib"] / 1024 / n, 2)}
        for name, u in parts.items()
    }
    out["page_tables"] = {"kernel": round(memory.page_tables_kib / 1024 / n, 2)}
    return out


async def _measure_idle(sandboxes: list[Sandbox], guest_ram: Path) -> IdleSample:
    pids = [sb.vm.pid for sb in sandboxes if sb.vm is not None and sb.vm.pid is not None]
    busy0, total0 = _host_busy_ticks()
    before = cpu_use(pids)
    t0 = time.perf_counter()
    await asyncio.sleep(IDLE_WINDOW_S)  # the idle period being measured
    used = cpu_use(pids) - before
    window = time.perf_counter() - t0
    busy1, total1 = _host_busy_ticks()
    memory = vmm_memory.VmmMemory()
    for pid in pids:
        memory += vmm_memory.read(pid, guest_ram)
    return IdleSample(
        len(pids),
        memory,
        used,
        window,
        (busy1 - busy0) / max(1, total1 - total0),
        _meminfo_kib("MemAvailable"),
    )


async def _create_and_run(snapshot: Snapshot, template: Template, root: Path) -> tuple[Sandbox, float]:
    t0 = time.perf_counter()
    sb = await Sandbox.restore(snapshot, template, root)
    try:
        await (await sb.code_interpreter()).run_code("1+1")
    except BaseException:
        await sb.destroy()
        raise
    return sb, time.perf_counter() - t0


async def _latencies(
    snapshot: Snapshot, template: Template, root: Path, samples: int, progress: Callable[[int], None]
) -> list[float]:
    """`samples` new sandboxes' create → `run_code("1+1")`, one at a time, each destroyed after."""
    out: list[float] = []
    for _ in range(samples):
        sb, seconds = await _create_and_run(snapshot, template, root)
        await sb.destroy()
        out.append(seconds)
        progress(1)
    return out


async def _destroy_all(sandboxes: list[Sandbox]) -> None:
    gate = asyncio.Semaphore(TEARDOWN_CONCURRENCY)

    async def one(sb: Sandbox) -> None:
        async with gate:
            await sb.destroy()

    await asyncio.gather(*(one(sb) for sb in sandboxes), return_exceptions=True)


async def bench_density(
    template_name: str, max_sandboxes: int, progress: Callable[[int], None], samples: int = 40
) -> dict[str, Any]:
    template = get_template(template_name)
    snapshot = ensure_snapshot(template)
    total_kib = _meminfo_kib("MemTotal")
    available_before = _meminfo_kib("MemAvailable")
    marks = checkpoints(max_sandboxes)
    curve: list[IdleSample] = []
    stopped = "max_sandboxes"
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-") as tmp:
        root = Path(tmp)
        empty = await _latencies(snapshot, template, root, samples, progress)
        sandboxes: list[Sandbox] = []
        fill: list[float] = []
        try:
            t_fill = time.perf_counter()
            while len(sandboxes) < max_sandboxes:
                if _meminfo_kib("MemAvailable") < MIN_AVAILABLE_FRACTION * total_kib:
                    stopped = "memory_floor"
                    break
                sb, seconds = await _create_and_run(snapshot, template, root)
                sandboxes.append(sb)
                fill.append(seconds)
                progress(1)
                if len(sandboxes) in marks:
                    curve.append(await _measure_idle(sandboxes, snapshot.memory))
            fill_s = time.perf_counter() - t_fill
            if not curve or curve[-1].sandboxes != len(sandboxes):
                curve.append(await _measure_idle(sandboxes, snapshot.memory))
            loaded = await _latencies(snapshot, template, root, samples, progress)
        finally:
            await _destroy_all(sandboxes)
    last = curve[-1]
    point = last.point()
    p99_empty, p99_loaded = percentile(empty, 99), percentile(loaded, 99)
    return {
        "template": template_name,
        "guest_memory_mib": snapshot.memory_mib,
        "sandboxes": last.sandboxes,
        "stopped_by": stopped,
        "curve": [s.point() for s in curve],
        "pss_mib_per_sandbox": point["pss_mib_per_sandbox"],
        "private_mib_per_sandbox": point["private_mib_per_sandbox"],
        "breakdown_mib_per_sandbox": breakdown_mib(last.memory, last.sandboxes),
        "idle_cpu_percent_per_sandbox": point["idle_cpu_percent_per_sandbox"],
        "idle_cpu_percent_total": round(100 * last.cpu.ns / 1e9 / last.window_s, 2),
        "idle_wakeups_per_s_per_sandbox": point["idle_wakeups_per_s_per_sandbox"],
        "create_run_code_empty": summary_ms(empty),
        "create_run_code_loaded": summary_ms(loaded),
        "p99_loaded_over_empty": round(p99_loaded / p99_empty, 2),
        "fill": {**summary_ms(fill), "seconds": round(fill_s, 1)},
        "memory_total_mib": round(total_kib / 1024),
        "memory_available_before_mib": round(available_before / 1024),
        "estimated_capacity_by_memory": int(
            available_before / 1024 * (1 - MIN_AVAILABLE_FRACTION) / point["pss_mib_per_sandbox"]
        ),
        "what": (
            f"create -> run_code('1+1') of a new sandbox (n={samples}) on the empty machine and with "
            f"{last.sandboxes} idle restored sandboxes held; at each checkpoint, host memory of every VMM "
            "(smaps: PSS, private, by what it holds; page tables apart) and their CPU and wake-ups "
            f"(schedstat) over {IDLE_WINDOW_S:g} s idle, per sandbox; capacity = memory available before "
            "/ PSS per sandbox, keeping a quarter of the host free"
        ),
    }
