"""`bench throughput`: python-ds sandboxes created per second through the REST API, at concurrency 1, 2, 4.

Each client loops create → `run_code("1+1")` → delete against one daemon (its pool of pre-started VMMs
sized to the concurrency), for a fixed time; the rate counts sandboxes that answered. This is the
sustained rate, pool refills included, not a burst from a full pool.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tartarus.bench.stats import summary_ms
from tartarus.daemon.config import DaemonConfig
from tartarus.daemon.server import daemon_thread
from tartarus.sdk import AsyncClient, AsyncSandbox


async def _client(url: str, template: str, deadline: float, latencies: list[float]) -> None:
    async with AsyncClient(url) as client:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            sb = await AsyncSandbox.create(template, client=client)
            try:
                answer = await sb.run_code("1+1")
                if answer.result != "2":
                    raise RuntimeError(f"run_code('1+1') answered {answer}")
                latencies.append(time.perf_counter() - t0)
            finally:
                await sb.kill()


async def bench_throughput(
    template: str, levels: list[int], seconds: float, progress: Callable[[int], None]
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-") as tmp:
        uds = Path(tmp) / "api.sock"
        with daemon_thread(Path(tmp) / "state", uds, DaemonConfig(pool_size=max(levels))):
            url = f"unix://{uds}"
            for level in levels:
                latencies: list[float] = []
                t0 = time.perf_counter()
                deadline = t0 + seconds
                await asyncio.gather(*(_client(url, template, deadline, latencies) for _ in range(level)))
                elapsed = time.perf_counter() - t0
                results[str(level)] = {
                    "sandboxes": len(latencies),
                    "seconds": round(elapsed, 2),
                    "sandboxes_per_s": round(len(latencies) / elapsed, 2),
                    "create_to_answer": summary_ms(latencies),
                }
                progress(1)
    best = max(results.values(), key=lambda r: r["sandboxes_per_s"])
    return {
        "template": template,
        "samples": sum(r["sandboxes"] for r in results.values()),
        "by_concurrency": results,
        "peak_sandboxes_per_s": best["sandboxes_per_s"],
        "what": (
            "clients looping create → run_code('1+1') → delete through the REST API on a unix socket "
            "for a fixed time at each concurrency; pool of pre-started VMMs sized to the largest level"
        ),
    }
