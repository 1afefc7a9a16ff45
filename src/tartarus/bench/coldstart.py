"""`bench cold-start`: create call → the sandbox answering `run_code("1+1")`, restored from a snapshot
(`cold`), and served by a ready sandbox (`warm`, `steady`, `burst`: `bench.warmstart`).

"Cold" as the issue defines it: no guest of that sandbox ran before the create call. Pre-started VMMs
waiting for their incoming state are fair and used (the pool is refilled between rounds, as a daemon at a
sustainable create rate would have it). Also reported: per-phase breakdown, the same path through the
REST API, and host memory (PSS) per idle sandbox.

Per backend (`backends`): the gVisor counterparts are a restore of the template's warm image into a
container `runsc create` made ahead (`snapshots.gvisor_pool`; `cold`), the same into a container made
in the call (`cold_unpooled`), and a create served by the gVisor ready pool (`warm`); with its own
phases (where a gVisor create's time goes).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tartarus.bench.stats import summary_ms
from tartarus.bench.warmstart import bench_warm_start
from tartarus.limits.spec import template_limits
from tartarus.sandbox.backend import Backend
from tartarus.sandbox.choice import check_available, vm_backend
from tartarus.sandbox.sandbox import Sandbox
from tartarus.snapshots.build import ensure_snapshot
from tartarus.snapshots.gvisor_pool import GvisorPool
from tartarus.snapshots.pool import SparePool, VMMPool
from tartarus.snapshots.snapshot import Snapshot
from tartarus.templates.built import Template, get_template

if TYPE_CHECKING:
    from tartarus.sdk import AsyncClient

PHASES = ("vmm_ready", "state_loaded", "guest_resumed", "first_answer")
# A gVisor create's spans (`Sandbox._start_gvisor`): its network and cgroups, `runsc create`, the
# restore (memory and kernel state loaded), the restored agent's answer, its configure, the env.
GVISOR_PHASES = ("contained", "runsc_created", "state_loaded", "agent_ready", "configured", "first_answer")
IDLE_SANDBOXES = 8


async def wait_full(pool: SparePool, timeout: float = 120.0) -> None:
    async with asyncio.timeout(timeout):
        while len(pool) < pool.size:
            await asyncio.sleep(0.01)


async def _one(
    snapshot: Snapshot, template: Template, root: Path, pool: VMMPool
) -> tuple[float, dict[str, float]]:
    t0 = time.perf_counter()
    sandbox = await Sandbox.restore(snapshot, template, root, None, pool.take())
    interpreter = await sandbox.code_interpreter()
    answer = await interpreter.run_code("1+1")
    total = time.perf_counter() - t0
    if answer.result != "2":
        raise RuntimeError(f"run_code('1+1') answered {answer}")
    phases = dict(sandbox.timings)
    phases["run_code"] = total
    await sandbox.destroy()
    return total, phases


async def _rounds(
    snapshot: Snapshot, template: Template, samples: int, concurrency: int, progress: Callable[[int], None]
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-") as tmp:
        root = Path(tmp)
        pool = VMMPool(snapshot, template, root, size=concurrency)
        totals: list[float] = []
        phases: dict[str, list[float]] = {p: [] for p in (*PHASES, "run_code")}
        pooled = 0
        try:
            while len(totals) < samples:
                await wait_full(pool)
                n = min(concurrency, samples - len(totals))
                results = await asyncio.gather(*(_one(snapshot, template, root, pool) for _ in range(n)))
                pool.refill()
                for total, ph in results:
                    totals.append(total)
                    pooled += int(ph.get("pooled", 0))
                    for name in phases:
                        phases[name].append(ph[name])
                progress(n)
        finally:
            await pool.close()
    return {
        **summary_ms(totals),
        "concurrency": concurrency,
        "pooled_fraction": pooled / len(totals),
        "phases_cumulative": {name: summary_ms(values) for name, values in phases.items()},
    }


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


async def _idle_memory(snapshot: Snapshot, template: Template) -> dict[str, Any]:
    """PSS of each VMM with IDLE_SANDBOXES restored sandboxes idle (after one run_code each)."""
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-") as tmp:
        sandboxes: list[Sandbox] = []
        try:
            for _ in range(IDLE_SANDBOXES):
                sb = await Sandbox.restore(snapshot, template, Path(tmp))
                await (await sb.code_interpreter()).run_code("1+1")
                sandboxes.append(sb)
            await asyncio.sleep(2)  # let the guests go idle before measuring, as idle sandboxes are
            pss = [pss_kib(sb.vm.pid) for sb in sandboxes if sb.vm and sb.vm.pid]
        finally:
            await asyncio.gather(*(sb.destroy() for sb in sandboxes))
    return {
        "idle_sandboxes": len(pss),
        "pss_mib_per_sandbox_mean": round(sum(pss) / len(pss) / 1024, 1),
        "pss_mib_per_sandbox_max": round(max(pss) / 1024, 1),
        "guest_memory_mib": snapshot.memory_mib,
    }


async def _api(template: Template, samples: int, ready: int = 0) -> dict[str, Any]:
    """The same create → run_code through the daemon's REST API on a unix socket (sequential); with
    `ready`, served by a daemon's ready pool of that size (full before each create)."""
    from tartarus.daemon.config import DaemonConfig, ReadySizes
    from tartarus.daemon.server import daemon_thread
    from tartarus.sdk import AsyncClient, AsyncSandbox

    config = DaemonConfig(pool_size=2, ready_pool=ReadySizes(per_template={template.name: ready}))
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-") as tmp:
        uds = Path(tmp) / "api.sock"
        totals: list[float] = []
        hits = 0
        with daemon_thread(Path(tmp) / "state", uds, config):
            client = AsyncClient(f"unix://{uds}")
            try:
                for _ in range(samples):
                    # Wait for the daemon's pools to be full again, as in the runtime rounds.
                    while (await client.request("GET", "/v1/health")).json()["pooled"] < 2 or (
                        ready and await _ready_size(client) < ready
                    ):
                        await asyncio.sleep(0.01)
                    t0 = time.perf_counter()
                    sb = await AsyncSandbox.create(template.name, client=client)
                    answer = await sb.run_code("1+1")
                    totals.append(time.perf_counter() - t0)
                    hits += "ready" in sb.info.timings_ms
                    assert answer.result == "2", answer
                    await sb.kill()
            finally:
                await client.close()
    return {**summary_ms(totals), **({"hit_rate": hits / samples} if ready else {})}


async def _ready_size(client: AsyncClient) -> int:
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.request("GET", "/metrics")).text
    for family in text_string_to_metric_families(text):
        if family.name == "tartarus_ready_sandboxes":
            return int(family.samples[0].value)
    raise RuntimeError("the daemon exports no tartarus_ready_sandboxes")


@dataclass(frozen=True)
class WarmLoads:
    """The warm part (`bench.warmstart`): ready sandboxes per template, the steady arrival rate and
    its number of creates, the burst size and how many bursts. `samples` 0 skips it."""

    samples: int = 200
    ready: int = 2
    rate: float = 2.0
    steady_samples: int = 200
    burst: int = 10
    bursts: int = 5

    @property
    def steps(self) -> int:
        return self.samples + self.steady_samples + self.burst * self.bursts if self.samples else 0


async def _gvisor_one(template: Template, root: Path, pool: GvisorPool | None) -> dict[str, float]:
    t0 = time.perf_counter()
    prepared = pool.take() if pool is not None else None
    limits = template_limits(template)
    sandbox = await Sandbox.start_gvisor(template, root, limits=limits, prepared=prepared)
    try:
        answer = await (await sandbox.code_interpreter()).run_code("1+1")
        total = time.perf_counter() - t0
        if answer.result != "2":
            raise RuntimeError(f"run_code('1+1') answered {answer}")
        return {**sandbox.timings, "run_code": total}
    finally:
        await sandbox.destroy()


async def _gvisor_cold(
    template: Template, samples: int, pooled: bool, progress: Callable[[int], None]
) -> dict[str, Any]:
    """Sequential gVisor creates → run_code('1+1'), restored into a created-ahead container (`pooled`,
    the pool full again before each) or into one made in the call."""
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-") as tmp:
        root = Path(tmp)
        pool = GvisorPool(template, root, size=1) if pooled else None
        runs: list[dict[str, float]] = []
        try:
            for _ in range(samples):
                if pool is not None:
                    await wait_full(pool)
                runs.append(await _gvisor_one(template, root, pool))
                if pool is not None:
                    pool.refill()
                progress(1)
        finally:
            if pool is not None:
                await pool.close()
    phases = (*GVISOR_PHASES, "run_code")
    return {
        **summary_ms([r["run_code"] for r in runs]),
        "pooled_fraction": sum(r["pooled"] for r in runs) / len(runs),
        "phases_cumulative": {p: summary_ms([r[p] for r in runs]) for p in phases},
    }


async def _gvisor_cold_start(
    template_name: str, samples: int, progress: Callable[[int], None], warm: WarmLoads | None
) -> dict[str, Any]:
    template = get_template(template_name)
    cold = await _gvisor_cold(template, samples, True, progress)
    result: dict[str, Any] = {
        **cold,
        "backend": "gvisor",
        "cold": {k: v for k, v in cold.items() if k != "phases_cumulative"},
    }
    result["cold_unpooled"] = await _gvisor_cold(template, samples, False, progress)
    if warm is not None and warm.samples:
        result.update(await _warm(template_name, warm, progress, "gvisor"))
    result["what"] = (
        "cold: restore of the template's warm gVisor image into a container runsc created ahead (pool "
        "refilled between samples) until run_code('1+1') answers; cold_unpooled: the same into a "
        "container made in the call (network, cgroups, runsc create); phases are cumulative from the "
        "create call. warm: SandboxManager.create served by a ready gVisor sandbox (restored and warmed "
        "before the call)"
    )
    return result


async def _warm(
    template_name: str, warm: WarmLoads, progress: Callable[[int], None], backend: Backend | None = None
) -> dict[str, Any]:
    return await bench_warm_start(
        template_name,
        warm.samples,
        ready=warm.ready,
        rate=warm.rate,
        steady_samples=warm.steady_samples,
        burst=warm.burst,
        bursts=warm.bursts,
        progress=progress,
        backend=backend,
    )


async def bench_cold_start(
    template_name: str,
    samples: int,
    concurrency: int,
    api_samples: int,
    progress: Callable[[int], None],
    warm: WarmLoads | None = None,
    backends: tuple[Backend, ...] = (),
) -> dict[str, Any]:
    """The host's VM backend alone (no `backends`), as it always was; else each backend of `backends`
    in turn, in one run, each under `backends[<name>]` with its cold and warm figures."""
    if not backends:
        return await _vm_cold_start(template_name, samples, concurrency, api_samples, progress, warm)
    for backend in backends:
        check_available(backend)
    found: dict[str, Any] = {}
    for backend in backends:
        if backend == "gvisor":
            found[backend] = await _gvisor_cold_start(template_name, samples, progress, warm)
        else:
            found[backend] = await _vm_cold_start(
                template_name, samples, concurrency, api_samples, progress, warm
            )
            found[backend]["backend"] = vm_backend()
    return {"template": template_name, "samples": samples, "backends": found}


async def _vm_cold_start(
    template_name: str,
    samples: int,
    concurrency: int,
    api_samples: int,
    progress: Callable[[int], None],
    warm: WarmLoads | None = None,
) -> dict[str, Any]:
    template = get_template(template_name)
    snapshot = ensure_snapshot(template)
    sequential = await _rounds(snapshot, template, samples, 1, progress)
    result: dict[str, Any] = {**sequential, "template": template_name, "snapshot": snapshot.key}
    result["cold"] = {k: v for k, v in sequential.items() if k != "phases_cumulative"}
    if warm is not None and warm.samples:
        result.update(await _warm(template_name, warm, progress))
    if concurrency > 1:
        result["concurrent"] = await _rounds(snapshot, template, samples, concurrency, progress)
    result["memory"] = await _idle_memory(snapshot, template)
    if api_samples:
        result["api"] = await _api(template, api_samples)
        if warm is not None and warm.samples:
            result["api_warm"] = await _api(template, api_samples, warm.ready)
    result["what"] = (
        "cold (the headline figures): restore of the template snapshot into a pre-started VMM (pool "
        "refilled between rounds) until run_code('1+1') answers; phases are cumulative from the create "
        "call. warm: SandboxManager.create served by a ready sandbox (pool full before each) until "
        "run_code('1+1') answers; steady and burst: the same under creates arriving at a fixed rate or "
        "all at once, with the share served by the ready pool (hit_rate)"
    )
    return result
