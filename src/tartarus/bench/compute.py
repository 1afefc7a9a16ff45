"""`bench compute`: the same compute workloads on the host, in a gVisor sandbox and in a VM sandbox.

One script (below) times each workload inside one Python process, so interpreter start-up and the
channel are not counted: what is compared is how fast the sandbox's code runs. Every backend runs the
template's own files (the host run chroots into the template's tree, in a private mount namespace with
a tmpfs on /tmp), so Python, numpy and OpenBLAS are the same builds everywhere. BLAS is capped at one
thread: multi-threaded BLAS on a 2-core host measures contention, not the sandbox. OpenBLAS reports
the CPU kernel it picked (gVisor hides the CPU vendor, so it may pick another): that is recorded too.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tartarus.bench.stats import percentile
from tartarus.bootfiles.kernel import kernel_path
from tartarus.errors import TartarusError
from tartarus.gvisor.container import start_container
from tartarus.gvisor.rootfs import template_tree
from tartarus.runtime.accel import choose_accel
from tartarus.runtime.agent import AgentClient, Output
from tartarus.sandbox.sandbox import Sandbox, new_sandbox_id
from tartarus.templates.built import Template, get_template

BLAS_THREADS = 1
WORKLOADS = ("python_loop", "svd_300", "matmul_1000", "files_2000")
SCRIPT = r"""
import json, os, sys, time
import numpy as np

def python_loop():
    s = 0
    for i in range(3_000_000):
        s += i * i % 7
    return s

rng = np.random.default_rng(0)
a300 = rng.random((300, 300))
a1000 = rng.random((1000, 1000))
d = sys.argv[2]
os.makedirs(d, exist_ok=True)

def files():
    for i in range(2000):
        with open(f"{d}/f{i}", "w") as f:
            f.write("x")
    for i in range(2000):
        os.unlink(f"{d}/f{i}")

work = {
    "python_loop": python_loop,
    "svd_300": lambda: np.linalg.svd(a300),
    "matmul_1000": lambda: a1000 @ a1000,
    "files_2000": files,
}
out = {}
for name, fn in work.items():
    fn()  # warm: first-call costs (page faults, lazy imports) are not compute
    times = []
    for _ in range(int(sys.argv[1])):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    out[name] = times
print(json.dumps(out))
"""


@dataclass(frozen=True)
class BackendRun:
    """One backend's timings: every repetition of every workload, in seconds."""

    backend: str  # host, gvisor, tcg/kvm
    times: dict[str, list[float]]
    blas_core: str  # what OpenBLAS said it runs on, e.g. "Haswell"

    def p50_ms(self, workload: str) -> float:
        return round(percentile(self.times[workload], 50) * 1000, 3)


def env() -> dict[str, str]:
    threads = str(BLAS_THREADS)
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "OPENBLAS_NUM_THREADS": threads,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "OPENBLAS_VERBOSE": "2",  # OpenBLAS prints "Core: <kernel>" on stderr when it loads
    }


def argv(reps: int) -> list[str]:
    return ["python3", "-c", SCRIPT, str(reps), "/tmp/tartarus-bench-files"]


def parse(backend: str, stdout: str, stderr: str) -> BackendRun:
    try:
        times = json.loads(stdout)
    except json.JSONDecodeError:
        raise TartarusError(f"compute script on {backend} printed no result: {stderr[-1000:]}") from None
    core = next((ln.split(":", 1)[1].strip() for ln in stderr.splitlines() if ln.startswith("Core:")), "?")
    return BackendRun(backend, {k: [float(t) for t in times[k]] for k in WORKLOADS}, core)


def run_host(template: Template, reps: int) -> BackendRun:
    """In the template's tree, natively: chroot in a private mount namespace, a tmpfs on its /tmp (the
    namespace, and with it the tmpfs, ends with the script)."""
    shell = 'tree=$1; shift; mount -t tmpfs tmpfs "$tree/tmp" && exec chroot "$tree" env -i "$@"'
    args = [f"{k}={v}" for k, v in env().items()] + argv(reps)
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            shell,
            "sh",
            str(template_tree(template)),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        raise TartarusError(f"compute script on the host failed: {result.stderr[-1000:]}")
    return parse("host", result.stdout, result.stderr)


async def _in_agent(agent: AgentClient, backend: str, reps: int) -> BackendRun:
    process = await agent.exec(argv(reps), env=env(), timeout=1800)
    out, err = bytearray(), bytearray()
    async for event in process.events():
        if isinstance(event, Output):
            (out if event.stream == "stdout" else err).extend(event.data)
    return parse(backend, out.decode(), err.decode())


async def run_gvisor(template: Template, reps: int, root: Path) -> BackendRun:
    box = await start_container(template, new_sandbox_id(), root / "gvisor")
    try:
        assert box.agent is not None
        return await _in_agent(box.agent, "gvisor", reps)
    finally:
        await box.destroy()


async def run_vm(template: Template, reps: int, root: Path, accel: str) -> BackendRun:
    sandbox = await Sandbox.boot(template, root / "vm")
    try:
        return await _in_agent(sandbox.agent, accel, reps)
    finally:
        await sandbox.destroy()


def bench_compute(
    template_name: str, reps: int, progress: Callable[[int], None], *, vm: bool = True
) -> dict[str, Any]:
    """Each backend in turn, in one run; the result gives per-workload P50s and ratios to the host."""
    template = get_template(template_name)
    runs = [run_host(template, reps)]
    progress(1)
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-") as tmp:
        t0 = time.perf_counter()
        runs.append(asyncio.run(run_gvisor(template, reps, Path(tmp))))
        progress(1)
        if vm:
            runs.append(asyncio.run(run_vm(template, reps, Path(tmp), choose_accel(kernel_path()))))
            progress(1)
        elapsed = time.perf_counter() - t0
    host = runs[0]
    return {
        "template": template_name,
        "repetitions": reps,
        "blas_threads": BLAS_THREADS,
        "backends": {
            run.backend: {
                "blas_core": run.blas_core,
                "p50_ms": {w: run.p50_ms(w) for w in WORKLOADS},
                "ratio_to_host": {w: round(run.p50_ms(w) / host.p50_ms(w), 3) for w in WORKLOADS},
                "runs": asdict(run)["times"],
            }
            for run in runs
        },
        "sandboxed_seconds": round(elapsed, 1),
        "what": "in-process time of each workload (P50 of the repetitions after one warm-up), "
        "same template files on every backend",
    }
