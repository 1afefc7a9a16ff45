"""Runtime benchmarks: `boot` (cold boot to agent ready) and `exec` (round trip of `true`)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tartarus.bench.stats import summary_ms
from tartarus.sandbox.sandbox import Sandbox
from tartarus.templates.built import get_template

Progress = Callable[[int], None]


async def bench_boot(template_name: str, samples: int, progress: Progress) -> dict[str, Any]:
    """Create → guest agent answering, for a fresh VM each time (no snapshot), then destroy."""
    template = get_template(template_name)
    totals: list[float] = []
    vmm: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-") as tmp:
        root = Path(tmp)
        for _ in range(samples):
            t0 = time.perf_counter()
            sb = await Sandbox.boot(template, root)
            await sb.agent.ping()
            totals.append(time.perf_counter() - t0)
            vmm.append(sb.timings["vmm_ready"])
            await sb.destroy()
            progress(1)
    return {
        **summary_ms(totals),
        "phases": {"vmm_ready": summary_ms(vmm)},
        "template": template_name,
        "what": "Sandbox.boot (writable layer, QEMU spawn, kernel boot, agent HELLO) + one ping",
    }


async def bench_exec(template_name: str, samples: int, progress: Progress) -> dict[str, Any]:
    """Round trip of `true` through the agent in one running sandbox: spawn, exit, EXIT frame."""
    template = get_template(template_name)
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-") as tmp:
        sb = await Sandbox.boot(template, Path(tmp))
        try:
            for _ in range(5):  # warm the guest's page cache and TCG translation cache
                await _run_true(sb)
            times: list[float] = []
            for _ in range(samples):
                t0 = time.perf_counter()
                await _run_true(sb)
                times.append(time.perf_counter() - t0)
                progress(1)
            pings: list[float] = []
            for _ in range(samples):
                t0 = time.perf_counter()
                await sb.agent.ping()
                pings.append(time.perf_counter() - t0)
        finally:
            await sb.destroy()
    return {
        **summary_ms(times),
        "ping": summary_ms(pings),
        "template": template_name,
        "what": "exec of /bin/true in a running sandbox through the guest agent, to its EXIT frame",
    }


async def _run_true(sb: Sandbox) -> None:
    process = await sb.agent.exec(["/bin/true"])
    async for event in process.events():
        del event
    assert process.exit is not None and process.exit.exit_code == 0, process.exit


BENCHES: dict[str, Callable[[str, int, Progress], Any]] = {"boot": bench_boot, "exec": bench_exec}


def run_bench(name: str, template: str, samples: int, progress: Progress) -> dict[str, Any]:
    return asyncio.run(BENCHES[name](template, samples, progress))
