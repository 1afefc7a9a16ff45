"""`bench e2b`: the same work through E2B's unmodified SDKs and through Tartarus's own, in one run:
create → `commands.run("echo hi")` answered (`e2b`), and create → `run_code("1+1")` answered
(`e2b-code-interpreter`).

One `tartarus serve --e2b-port` on loopback TCP serves both: Tartarus's SDK calls the daemon's port, the
`e2b` SDK (in its own venv, driven by e2b_driver.py) calls the E2B port, whose layer calls the daemon.
Rounds alternate which side goes first, so a machine whose speed drifts during the run weighs on both
alike. A sample is create → the command's output back; the destroy after it is not timed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tartarus.bench.e2b_sdk import sdk_python
from tartarus.bench.load import served_daemon, tenant_key
from tartarus.bench.stats import percentile, summary_ms
from tartarus.sdk import Sandbox

DRIVER = Path(__file__).with_name("e2b_driver.py")
COMMAND = "echo hi"
SIDES = ("native", "e2b")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


WORKLOADS = {
    "commands": f"create → commands.run({COMMAND!r}) answered",
    "code": "create → run_code('1+1') answered",
}


def _answer(sb: Sandbox, workload: str) -> str | None:
    """The workload's call on a new sandbox; None if it answered right, else what was wrong. E2B's
    `commands.run(cmd)` is `/bin/bash -l -c cmd`: the same argv here, so both run the same."""
    if workload == "commands":
        r = sb.commands.run(["/bin/bash", "-l", "-c", COMMAND])
        return None if r.stdout == "hi\n" and r.exit_code == 0 else f"echo: {r.stdout!r}, exit {r.exit_code}"
    execution = sb.run_code("1+1")
    return None if execution.text == "2" else f"run_code answered {execution.text!r}"


def _native(url: str, key: str, template: str, workload: str, n: int) -> tuple[list[float], list[str]]:
    seconds: list[float] = []
    errors: list[str] = []
    for _ in range(n):
        t0 = time.perf_counter()
        sb = Sandbox.create(template, timeout=120, url=url, api_key=key)
        try:
            wrong = _answer(sb, workload)
            elapsed = time.perf_counter() - t0
            if wrong:
                errors.append(wrong)
            else:
                seconds.append(elapsed)
        finally:
            sb.kill()
    return seconds, errors


def _through_e2b(
    python: Path, env: dict[str, str], template: str, workload: str, n: int
) -> tuple[list[float], list[str]]:
    run = subprocess.run(
        [str(python), "-P", str(DRIVER), workload, template, str(n)],  # -P: not this package first
        env=env,
        capture_output=True,
        text=True,
        timeout=600 + 30 * n,
    )
    if run.returncode != 0:
        return [], [f"the e2b driver failed: {run.stderr[-2000:]}"]
    out = json.loads(run.stdout)
    return [float(s) for s in out["seconds"]], [str(e) for e in out["errors"]]


def _compare(native: list[float], e2b: list[float], errors: list[str], workload: str) -> dict[str, Any]:
    if not native or not e2b:
        raise RuntimeError(f"{workload}: no samples on one side; errors: {errors[:5]}")
    return {
        "workload": WORKLOADS[workload],
        "errors": len(errors),
        "error_samples": errors[:10],
        "native": summary_ms(native),
        "e2b": summary_ms(e2b),
        "ratio_p50": round(percentile(e2b, 50) / percentile(native, 50), 3),
        "ratio_p99": round(percentile(e2b, 99) / percentile(native, 99), 3),
    }


def run_e2b(samples: int, template: str, rounds: int, progress: Callable[[int], None]) -> dict[str, Any]:
    python = sdk_python()  # built (from PyPI) before anything is timed
    state = Path(tempfile.mkdtemp(prefix="tartarus-bench-e2b-"))
    e2b_port = _free_port()
    seconds: dict[tuple[str, str], list[float]] = {(w, side): [] for w in WORKLOADS for side in SIDES}
    errors: dict[str, list[str]] = {w: [] for w in WORKLOADS}
    per_round = math.ceil(samples / rounds)
    try:
        with served_daemon(state, 2, "--e2b-port", str(e2b_port), tcp_port=_free_port()) as (_, url):
            key = tenant_key(url, state, "bench")
            endpoint = f"http://127.0.0.1:{e2b_port}"
            env = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "PYTHON"))}
            env |= {"E2B_API_KEY": key, "E2B_API_URL": endpoint, "E2B_SANDBOX_URL": endpoint}
            for i in range(rounds):
                for workload in WORKLOADS:
                    n = min(per_round, samples - len(seconds[workload, "native"]))
                    for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                        if side == "native":
                            got, failed = _native(url, key, template, workload, n)
                        else:
                            got, failed = _through_e2b(python, env, template, workload, n)
                        seconds[workload, side].extend(got)
                        errors[workload].extend(f"{side}: {e}" for e in failed)
                        progress(n)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    by_workload = {w: _compare(seconds[w, "native"], seconds[w, "e2b"], errors[w], w) for w in WORKLOADS}
    return {
        "template": template,
        "rounds": rounds,
        "transport": "loopback TCP to one `tartarus serve --e2b-port`",
        **by_workload,
        **summary_ms(seconds["commands", "e2b"]),  # the headline: commands through E2B's SDK
    }
