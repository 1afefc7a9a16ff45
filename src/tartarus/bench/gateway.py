"""The gateway's cost, in `tartarus bench cluster`: the same calls through a gateway and directly on the
agent, interleaved in one run (so load from elsewhere hits both alike), on real processes.

One `tartarus agent` and one `tartarus gateway` run as subprocesses on loopback with the benchmark's
PostgreSQL. Creates: each sample times a create through the gateway (placement, the agent call, the
confirm) and one straight to the agent, in alternating order; the agent's own handling time (its
Server-Timing: runtime + api, passed on by the gateway) is subtracted from each, so what remains is what
lies outside the agent, and the gateway's overhead is that remainder's difference between the two
paths. Exec round trips (`true`, the whole NDJSON stream read) and a plain GET of the sandbox are timed
the same way, both paths alternating, on one sandbox.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tartarus.bench.stats import percentile, summary_ms
from tartarus.errors import TartarusError

Progress = Callable[[int], None]
_TIMING = re.compile(r"(runtime|api);dur=([0-9.]+)")


@dataclass
class _Process:
    proc: subprocess.Popen[bytes]
    url: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _role(role: str, state: Path, env: dict[str, str], *args: str) -> Iterator[_Process]:
    port = _free_port()
    log = (state.parent / f"{role}.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tartarus.cli.main", role, "--host", "127.0.0.1", "--port", str(port), *args],
        env={**env, "TARTARUS_STATE_DIR": str(state)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise TartarusError(f"`tartarus {role}` exited: see {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TartarusError(f"`tartarus {role}` did not come up: see {log.name}")
            time.sleep(0.1)
        yield _Process(proc, url)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        log.close()


def _agent_ms(response: httpx.Response) -> float:
    """What the agent says it spent handling the call (Server-Timing runtime + api), in ms."""
    found = dict(_TIMING.findall(response.headers.get("server-timing", "")))
    if set(found) != {"runtime", "api"}:
        raise TartarusError(f"no Server-Timing on the create answer: {response.headers}")
    return float(found["runtime"]) + float(found["api"])


def _exec(client: httpx.Client, path: str) -> float:
    t0 = time.perf_counter()
    with client.stream("POST", path, json={"argv": ["true"]}) as stream:
        if stream.status_code != 200:
            raise TartarusError(f"exec answered {stream.status_code}: {stream.read()!r}")
        for _ in stream.iter_bytes():
            pass
    return time.perf_counter() - t0


def bench_gateway(
    database_url: str, template: str, creates: int, calls: int, progress: Progress
) -> dict[str, Any]:
    token = secrets.token_hex(32)
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-gw-") as tmp:
        root = Path(tmp)
        (root / "agent").mkdir()
        (root / "gateway").mkdir()
        env = {
            **os.environ,
            "TARTARUS_DATABASE_URL": database_url,
            "TARTARUS_AGENT_TOKEN": token,
            "TARTARUS_POOL_SIZE": "0",
        }
        with (
            _role("agent", root / "agent", env, "--name", "bench-agent", "--slots", "8") as agent,
            _role("gateway", root / "gateway", env) as gateway,
        ):
            key = (root / "agent" / "admin.key").read_text().strip()
            user = {"Authorization": f"Bearer {key}"}
            direct_headers = {"Authorization": f"Bearer {token}", "x-tartarus-caller": "bench local admin"}
            with (
                httpx.Client(base_url=gateway.url, headers=user, timeout=300) as via,
                httpx.Client(base_url=agent.url, headers=direct_headers, timeout=300) as direct,
            ):
                return _measure(via, direct, template, creates, calls, progress)


def _measure(
    via: httpx.Client, direct: httpx.Client, template: str, creates: int, calls: int, progress: Progress
) -> dict[str, Any]:
    paths = {"gateway": via, "direct": direct}
    total: dict[str, list[float]] = {"gateway": [], "direct": []}
    outside: dict[str, list[float]] = {"gateway": [], "direct": []}
    for i in range(creates):
        order = ("gateway", "direct") if i % 2 == 0 else ("direct", "gateway")
        for name in order:
            client = paths[name]
            t0 = time.perf_counter()
            answer = client.post("/v1/sandboxes", json={"template": template})
            elapsed = time.perf_counter() - t0
            if answer.status_code != 201:
                raise TartarusError(f"create through {name} answered {answer.status_code}: {answer.text}")
            total[name].append(elapsed)
            outside[name].append(elapsed - _agent_ms(answer) / 1000)
            client.delete(f"/v1/sandboxes/{answer.json()['id']}").raise_for_status()
        progress(1)
    sandbox = via.post("/v1/sandboxes", json={"template": template})
    sandbox.raise_for_status()
    sid = sandbox.json()["id"]
    execs: dict[str, list[float]] = {"gateway": [], "direct": []}
    gets: dict[str, list[float]] = {"gateway": [], "direct": []}
    try:
        for i in range(calls):
            order = ("gateway", "direct") if i % 2 == 0 else ("direct", "gateway")
            for name in order:
                execs[name].append(_exec(paths[name], f"/v1/sandboxes/{sid}/exec"))
                t0 = time.perf_counter()
                paths[name].get(f"/v1/sandboxes/{sid}").raise_for_status()
                gets[name].append(time.perf_counter() - t0)
            progress(1)
    finally:
        via.delete(f"/v1/sandboxes/{sid}")

    def overhead(a: list[float], b: list[float]) -> dict[str, float]:
        return {f"p{q}_ms": round((percentile(a, q) - percentile(b, q)) * 1000, 3) for q in (50, 99)}

    return {
        "template": template,
        "create": {
            "gateway": summary_ms(total["gateway"]),
            "direct": summary_ms(total["direct"]),
            "outside_agent_gateway": summary_ms(outside["gateway"]),
            "outside_agent_direct": summary_ms(outside["direct"]),
            "gateway_overhead": overhead(outside["gateway"], outside["direct"]),
        },
        "exec_true": {
            "gateway": summary_ms(execs["gateway"]),
            "direct": summary_ms(execs["direct"]),
            "gateway_overhead": overhead(execs["gateway"], execs["direct"]),
        },
        "get_sandbox": {
            "gateway": summary_ms(gets["gateway"]),
            "direct": summary_ms(gets["direct"]),
            "gateway_overhead": overhead(gets["gateway"], gets["direct"]),
        },
    }
