"""`bench cold-start`'s warm part: create → `run_code("1+1")` answered when a ready sandbox (restored,
distinct and warmed before the call: `snapshots.ready`) serves the create, through the daemon's own
start path (`SandboxManager.create`: admission, bind, containment, the table; no HTTP).

Three loads: `warm`, sequential with the pool full before each create (the latency of a hit); `steady`,
creates arriving at a fixed rate whatever the earlier ones are doing (the hit rate a pool of that size
sustains, and the latency then, refills running between creates); `burst`, creates arriving all at
once (the pool empties; the rest are restored). Every sample says whether it was a hit.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tartarus.bench.stats import summary_ms
from tartarus.daemon.config import DaemonConfig, ReadySizes
from tartarus.daemon.manager import SandboxManager
from tartarus.sandbox.backend import Backend
from tartarus.sandbox.spec import SandboxSpec


@dataclass(frozen=True)
class Sample:
    seconds: float
    hit: bool


async def _create_and_run(manager: SandboxManager, template: str) -> Sample:
    t0 = time.perf_counter()
    record = await manager.create(SandboxSpec(template))
    runtime = record.runtime
    assert runtime is not None
    answer = await (await runtime.code_interpreter()).run_code("1+1")
    seconds = time.perf_counter() - t0
    hit = "ready" in runtime.timings
    await manager.destroy(record.id)
    if answer.result != "2":
        raise RuntimeError(f"run_code('1+1') answered {answer}")
    return Sample(seconds, hit)


async def _full(manager: SandboxManager, size: int, timeout: float = 300.0) -> None:
    async with asyncio.timeout(timeout):
        while manager.pools.ready_stats.size < size:
            await asyncio.sleep(0.01)


def _summary(samples: list[Sample]) -> dict[str, Any]:
    hits = [s.seconds for s in samples if s.hit]
    misses = [s.seconds for s in samples if not s.hit]
    split = {"hits": summary_ms(hits), "misses": summary_ms(misses)} if hits and misses else {}
    return {
        **summary_ms([s.seconds for s in samples]),
        "hit_rate": round(len(hits) / len(samples), 4),
        **split,  # each kind apart, when there were both
    }


async def _sequential(
    manager: SandboxManager, template: str, size: int, samples: int, progress: Callable[[int], None]
) -> dict[str, Any]:
    results = []
    for _ in range(samples):
        await _full(manager, size)
        results.append(await _create_and_run(manager, template))
        progress(1)
    return _summary(results)


async def _steady(
    manager: SandboxManager,
    template: str,
    size: int,
    rate: float,
    samples: int,
    progress: Callable[[int], None],
) -> dict[str, Any]:
    """Creates at `rate` per second (open loop: each at its time, however long the others take)."""
    await _full(manager, size)
    start = time.perf_counter()
    tasks = []
    for i in range(samples):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(_create_and_run(manager, template))
        task.add_done_callback(lambda _: progress(1))
        tasks.append(task)
    return {**_summary(list(await asyncio.gather(*tasks))), "rate_per_s": rate}


async def _bursts(
    manager: SandboxManager,
    template: str,
    size: int,
    burst: int,
    rounds: int,
    progress: Callable[[int], None],
) -> dict[str, Any]:
    results: list[Sample] = []
    for _ in range(rounds):
        await _full(manager, size)
        results += await asyncio.gather(*(_create_and_run(manager, template) for _ in range(burst)))
        progress(burst)
    return {**_summary(results), "burst": burst, "rounds": rounds}


async def bench_warm_start(
    template: str,
    samples: int,
    *,
    ready: int,
    rate: float,
    steady_samples: int,
    burst: int,
    bursts: int,
    progress: Callable[[int], None],
    backend: Backend | None = None,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-") as tmp:
        # A miss restores into a pre-started VMM (or created-ahead gVisor container), as the daemon's
        # would; `backend` is the daemon's default (None: the host's VM one).
        sizes = ReadySizes(per_template={template: ready})
        config = DaemonConfig(pool_size=1, ready_pool=sizes, backend=backend)
        manager = SandboxManager(Path(tmp), config)
        manager.open()
        manager.start_pools()
        try:
            warm = await _sequential(manager, template, ready, samples, progress)
            steady = await _steady(manager, template, ready, rate, steady_samples, progress)
            bursts_ = await _bursts(manager, template, ready, burst, bursts, progress)
        finally:
            await manager.close()
    return {"ready_pool": ready, "warm": warm, "steady": steady, "burst": bursts_}
