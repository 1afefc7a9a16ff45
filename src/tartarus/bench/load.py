"""Load test of the control plane: N concurrent clients create, exec in, and destroy sandboxes for a while.

The daemon runs as its own process (`tartarus serve` on a private unix socket and state dir), so its
memory is measured alone and its VMs can be counted after it is done. Loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tartarus.bench.stats import summary_ms
from tartarus.errors import TartarusError
from tartarus.sandbox.reap import reap_leftovers
from tartarus.sdk import AsyncClient, AsyncSandbox, SandboxInfo


@dataclass
class _Tally:
    create: list[float] = field(default_factory=list)
    exec: list[float] = field(default_factory=list)
    destroy: list[float] = field(default_factory=list)
    overhead: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cycles: int = 0


def api_overhead(server_timing: str) -> list[float]:
    """The `api` duration (seconds) of a Server-Timing header, if present."""
    for part in server_timing.split(","):
        name, _, params = part.strip().partition(";")
        if name == "api" and params.startswith("dur="):
            return [float(params.removeprefix("dur=")) / 1000]
    return []


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _qemu_under(path: Path) -> int:
    """QEMU processes whose command line mentions `path` (this daemon's VMs)."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"qemu-system" in cmdline and str(path).encode() in cmdline:
                count += 1
    return count


@contextlib.contextmanager
def served_daemon(
    state: Path, pool_size: int, *args: str, tcp_port: int | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`tartarus serve` as its own process for a benchmark, on a private unix socket (or loopback TCP
    port `tcp_port`) and state dir; yields it and its URL. `args` go to `serve` (e.g. `--e2b-port`)."""
    uds = state / "tartarus.sock"
    listen = ["--host", "127.0.0.1", "--port", str(tcp_port)] if tcp_port else ["--socket", str(uds)]
    url = f"http://127.0.0.1:{tcp_port}" if tcp_port else f"unix://{uds}"
    env = {**os.environ, "TARTARUS_STATE_DIR": str(state), "TARTARUS_POOL_SIZE": str(pool_size)}
    log = (state / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tartarus.cli.main", "serve", *listen, *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise TartarusError(f"the daemon exited at start; see {state / 'daemon.log'}")
            with contextlib.suppress(httpx.HTTPError), http_client(url, timeout=2) as c:
                if c.get("/v1/health").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TartarusError("the daemon did not answer within 60 s")
            time.sleep(0.05)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        # A served daemon's VMMs outlive it: one that did not stop cleanly leaves them to reap.
        reap_leftovers(state / "sandboxes")


def http_client(url: str, **kwargs: Any) -> httpx.Client:
    """A client for a `served_daemon` URL (unix:// or http://), paths relative to it."""
    if url.startswith("unix://"):
        transport = httpx.HTTPTransport(uds=url.removeprefix("unix://"))
        return httpx.Client(transport=transport, base_url="http://tartarus", **kwargs)
    return httpx.Client(base_url=url, **kwargs)


def tenant_key(url: str, state: Path, tenant: str) -> str:
    """A new key of `tenant`, made with the daemon's local admin key."""
    admin = (state / "admin.key").read_text().strip()
    with http_client(url, headers={"Authorization": f"Bearer {admin}"}) as c:
        response = c.post("/v1/keys", json={"tenant": tenant, "description": "bench"})
        response.raise_for_status()
        return str(response.json()["key"])


async def _client(
    url: str, key: str, template: str, until: float, tally: _Tally, progress: Callable[[int], None]
) -> None:
    client = AsyncClient(url, key)
    try:
        while time.monotonic() < until:
            try:
                t0 = time.perf_counter()
                body = {"template": template, "labels": {"bench": "load"}}
                response = await client.request("POST", "/v1/sandboxes", json=body)
                t1 = time.perf_counter()
                sb = AsyncSandbox(SandboxInfo.from_json(response.json()), client)
                tally.overhead.extend(api_overhead(response.headers.get("server-timing", "")))
                result = await sb.commands.run(["/bin/echo", sb.id])
                t2 = time.perf_counter()
                if result.exit_code != 0 or result.stdout.strip() != sb.id:
                    tally.errors.append(f"exec in {sb.id}: exit {result.exit_code} {result.stdout!r}")
                await client.request("DELETE", f"/v1/sandboxes/{sb.id}")
                t3 = time.perf_counter()
                tally.create.append(t1 - t0)
                tally.exec.append(t2 - t1)
                tally.destroy.append(t3 - t2)
                tally.cycles += 1
                progress(1)
            except TartarusError as e:
                tally.errors.append(f"{e.code}: {e.message}")
    finally:
        await client.close()


async def _drive(
    url: str,
    key: str,
    template: str,
    clients: int,
    duration: float,
    pid: int,
    progress: Callable[[int], None],
) -> tuple[_Tally, list[float]]:
    tally = _Tally()
    rss: list[float] = []

    async def sample() -> None:
        while True:
            rss.append(_rss_mib(pid))
            await asyncio.sleep(1)

    sampler = asyncio.create_task(sample())
    until = time.monotonic() + duration
    await asyncio.gather(*(_client(url, key, template, until, tally, progress) for _ in range(clients)))
    sampler.cancel()
    rss.append(_rss_mib(pid))
    return tally, rss


def _no_progress(n: int) -> None:
    pass


def run_load(
    clients: int,
    duration: float,
    template: str = "python-ds",
    pool_size: int = 2,
    progress: Callable[[int], None] = _no_progress,
) -> dict[str, Any]:
    """Run the load; returns latencies, error and leak counts, and the daemon's memory over time.

    The daemon uses TARTARUS_DATABASE_URL if set (else SQLite in its private state dir)."""
    state = Path(tempfile.mkdtemp(prefix="tartarus-load-"))
    try:
        with served_daemon(state, pool_size) as (proc, url):
            key = tenant_key(url, state, "load")
            started = time.monotonic()
            tally, rss = asyncio.run(_drive(url, key, template, clients, duration, proc.pid, progress))
            elapsed = time.monotonic() - started
            with http_client(url) as c:
                left = c.get("/v1/sandboxes", headers={"Authorization": f"Bearer {key}"}).json()["sandboxes"]
        leaked_after_exit = _qemu_under(state)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    quarter = max(1, len(rss) // 4)
    early, late = sorted(rss[:quarter]), sorted(rss[-quarter:])
    return {
        "clients": clients,
        "duration_s": round(elapsed, 1),
        "cycles": tally.cycles,
        "cycles_per_s": round(tally.cycles / elapsed, 2),
        "errors": len(tally.errors),
        "error_samples": tally.errors[:10],
        "sandboxes_left": len(left),
        "vms_left_after_exit": leaked_after_exit,
        "daemon_rss_mib": {
            "first": round(rss[0], 1),
            "early_median": round(early[len(early) // 2], 1),
            "late_median": round(late[len(late) // 2], 1),
            "max": round(max(rss), 1),
            "samples": len(rss),
        },
        "create": summary_ms(tally.create) if tally.create else None,
        "exec": summary_ms(tally.exec) if tally.exec else None,
        "destroy": summary_ms(tally.destroy) if tally.destroy else None,
        "create_api_overhead": summary_ms(tally.overhead) if tally.overhead else None,
        **(
            summary_ms(tally.create)
            if tally.create
            else {"samples": 0, "p50_ms": 0, "p99_ms": 0, "max_ms": 0}
        ),
    }


async def _sequential_creates(
    url: str, key: str, template: str, samples: int, progress: Callable[[int], None]
) -> dict[str, Any]:
    client = AsyncClient(url, key)
    overhead: list[float] = []
    total: list[float] = []
    runtime: list[float] = []
    try:
        for _ in range(samples):
            t0 = time.perf_counter()
            response = await client.request("POST", "/v1/sandboxes", json={"template": template})
            total.append(time.perf_counter() - t0)
            timing = response.headers.get("server-timing", "")
            overhead.extend(api_overhead(timing))
            runtime.extend(float(p.split("dur=")[1]) / 1000 for p in timing.split(",") if "runtime;" in p)
            await client.request("DELETE", f"/v1/sandboxes/{response.json()['id']}")
            progress(1)
    finally:
        await client.close()
    client_side = [t - r for t, r in zip(total, runtime, strict=True)]
    return {
        **summary_ms(overhead),
        "server_overhead": summary_ms(overhead),
        "client_observed_overhead": summary_ms(client_side),
        "create_total": summary_ms(total),
    }


def run_api_overhead(
    samples: int, template: str = "python-ds", progress: Callable[[int], None] = _no_progress
) -> dict[str, Any]:
    """Sequential creates through the REST API: what the control plane adds on top of the runtime.

    `server_overhead`: the daemon's own time beyond the runtime's (auth, quota, store, audit fsync), from
    its Server-Timing header; `client_observed_overhead`: the client's create time minus the runtime's
    (adds HTTP on the unix socket and JSON)."""
    state = Path(tempfile.mkdtemp(prefix="tartarus-api-"))
    try:
        with served_daemon(state, pool_size=2) as (_, url):
            key = (state / "admin.key").read_text().strip()
            return asyncio.run(_sequential_creates(url, key, template, samples, progress))
    finally:
        shutil.rmtree(state, ignore_errors=True)
