"""`bench e2b`: the same work through E2B's unmodified SDK and through Tartarus's own, in one run.

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _native(url: str, key: str, template: str, n: int) -> tuple[list[float], list[str]]:
    """E2B's `commands.run(cmd)` is `/bin/bash -l -c cmd`: the same argv here, so both run the same."""
    seconds: list[float] = []
    errors: list[str] = []
    for _ in range(n):
        t0 = time.perf_counter()
        sb = Sandbox.create(template, timeout=120, url=url, api_key=key)
        try:
            r = sb.commands.run(["/bin/bash", "-l", "-c", COMMAND])
            elapsed = time.perf_counter() - t0
            if r.stdout != "hi\n" or r.exit_code != 0:
                errors.append(f"echo answered {r.stdout!r}, exit {r.exit_code}")
            else:
                seconds.append(elapsed)
        finally:
            sb.kill()
    return seconds, errors


def _through_e2b(python: Path, env: dict[str, str], template: str, n: int) -> tuple[list[float], list[str]]:
    run = subprocess.run(
        [str(python), "-P", str(DRIVER), "commands", template, str(n)],  # -P: not this package first
        env=env,
        capture_output=True,
        text=True,
        timeout=600 + 30 * n,
    )
    if run.returncode != 0:
        return [], [f"the e2b driver failed: {run.stderr[-2000:]}"]
    out = json.loads(run.stdout)
    return [float(s) for s in out["seconds"]], [str(e) for e in out["errors"]]


def run_e2b(samples: int, template: str, rounds: int, progress: Callable[[int], None]) -> dict[str, Any]:
    python = sdk_python()  # built (from PyPI) before anything is timed
    state = Path(tempfile.mkdtemp(prefix="tartarus-bench-e2b-"))
    e2b_port = _free_port()
    native: list[float] = []
    e2b: list[float] = []
    errors: list[str] = []
    per_round = math.ceil(samples / rounds)
    try:
        with served_daemon(state, 2, "--e2b-port", str(e2b_port), tcp_port=_free_port()) as (_, url):
            key = tenant_key(url, state, "bench")
            endpoint = f"http://127.0.0.1:{e2b_port}"
            env = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "PYTHON"))}
            env |= {"E2B_API_KEY": key, "E2B_API_URL": endpoint, "E2B_SANDBOX_URL": endpoint}
            for i in range(rounds):
                n = min(per_round, samples - len(native))
                for side in ("native", "e2b") if i % 2 == 0 else ("e2b", "native"):
                    if side == "native":
                        seconds, failed = _native(url, key, template, n)
                        native.extend(seconds)
                    else:
                        seconds, failed = _through_e2b(python, env, template, n)
                        e2b.extend(seconds)
                    errors.extend(f"{side}: {e}" for e in failed)
                    progress(n)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    if not native or not e2b:
        raise RuntimeError(f"no samples on one side; errors: {errors[:5]}")
    native_s, e2b_s = summary_ms(native), summary_ms(e2b)
    return {
        "workload": f"create → commands.run({COMMAND!r}) answered",
        "template": template,
        "rounds": rounds,
        "errors": len(errors),
        "error_samples": errors[:10],
        "native": native_s,
        "e2b": e2b_s,
        "ratio_p50": round(percentile(e2b, 50) / percentile(native, 50), 3),
        "ratio_p99": round(percentile(e2b, 99) / percentile(native, 99), 3),
        **e2b_s,
    }
