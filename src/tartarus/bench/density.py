"""`bench density`: how many idle python-ds sandboxes this machine holds, and what each costs the host.

Sandboxes are restored one after another and left idle (after one `run_code`, as a user would leave
them); after each step the host memory of every VMM (PSS: shared template pages are split between the
sandboxes that map them) and their CPU use while idle are measured. The machine's capacity is then
estimated from the memory available before the first sandbox and the marginal cost per sandbox; it stops
early when less than a quarter of the host's memory is left, so the benchmark cannot take the host down.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tartarus.bench.coldstart import pss_kib
from tartarus.sandbox.sandbox import Sandbox
from tartarus.snapshots.build import ensure_snapshot
from tartarus.templates.built import get_template

IDLE_WINDOW_S = 2.0
MIN_AVAILABLE_FRACTION = 0.25


def _meminfo_kib(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/meminfo")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def _idle_cpu_percent(pids: list[int]) -> float:
    """Host CPU the idle VMMs use together, in percent of one core, over a short window."""
    before = sum(_cpu_seconds(p) for p in pids)
    t0 = time.perf_counter()
    await asyncio.sleep(IDLE_WINDOW_S)  # the idle period being measured
    used = sum(_cpu_seconds(p) for p in pids) - before
    return 100 * used / (time.perf_counter() - t0)


async def bench_density(
    template_name: str, max_sandboxes: int, progress: Callable[[int], None]
) -> dict[str, Any]:
    template = get_template(template_name)
    snapshot = ensure_snapshot(template)
    total_kib = _meminfo_kib("MemTotal")
    available_before = _meminfo_kib("MemAvailable")
    curve: list[dict[str, Any]] = []
    stopped = "max_sandboxes"
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-") as tmp:
        sandboxes: list[Sandbox] = []
        try:
            while len(sandboxes) < max_sandboxes:
                if _meminfo_kib("MemAvailable") < MIN_AVAILABLE_FRACTION * total_kib:
                    stopped = "memory_floor"
                    break
                sb = await Sandbox.restore(snapshot, template, Path(tmp))
                await (await sb.code_interpreter()).run_code("1+1")
                sandboxes.append(sb)
                pids = [s.vm.pid for s in sandboxes if s.vm and s.vm.pid]
                cpu = await _idle_cpu_percent(pids)
                pss = [pss_kib(p) for p in pids]
                curve.append(
                    {
                        "sandboxes": len(sandboxes),
                        "pss_total_mib": round(sum(pss) / 1024, 1),
                        "pss_mean_mib": round(sum(pss) / len(pss) / 1024, 1),
                        "idle_cpu_percent_total": round(cpu, 1),
                        "mem_available_mib": round(_meminfo_kib("MemAvailable") / 1024),
                    }
                )
                progress(1)
        finally:
            await asyncio.gather(*(sb.destroy() for sb in sandboxes), return_exceptions=True)
    last = curve[-1]
    per_sandbox_mib = last["pss_total_mib"] / last["sandboxes"]
    return {
        "template": template_name,
        "guest_memory_mib": snapshot.memory_mib,
        "samples": len(curve),
        "stopped_by": stopped,
        "curve": curve,
        "pss_mib_per_sandbox": round(per_sandbox_mib, 1),
        "idle_cpu_percent_per_sandbox": round(last["idle_cpu_percent_total"] / last["sandboxes"], 2),
        "memory_total_mib": round(total_kib / 1024),
        "memory_available_before_mib": round(available_before / 1024),
        "estimated_capacity_by_memory": int(
            available_before / 1024 * (1 - MIN_AVAILABLE_FRACTION) / per_sandbox_mib
        ),
        "what": (
            "idle restored python-ds sandboxes (one run_code each), added one at a time: host PSS of all "
            "VMMs and their idle CPU after each; capacity = memory available before / PSS per sandbox, "
            "keeping a quarter of the host free"
        ),
    }
