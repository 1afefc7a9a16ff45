"""`bench wake` and `bench hibernate`: a python-ds sandbox put to disk and woken, over and over.

Each cycle hibernates a sandbox that holds `dirty_mib` of its own memory (random bytes in its warm
interpreter) and wakes it; the wake clock runs from the wake call, with the sandbox holding no process,
to its interpreter answering a `run_code` that proves its memory came back (a counter it increments). As for
cold starts, pre-started VMMs waiting for incoming state are used (refilled between rounds).
The alternative a user would otherwise have — QEMU's own stream of every guest page, unfiltered — is
measured in the same run for comparison (`--baseline`). `--backend gvisor` runs the same cycles on
gVisor sandboxes (`runsc checkpoint` / `runsc restore`, no pool: a wake creates its container), side by
side with the VM's in one run when both are named.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tartarus.bench.coldstart import wait_full
from tartarus.bench.stats import summary_ms
from tartarus.bootfiles.kernel import kernel_path
from tartarus.hibernation import reflink
from tartarus.runtime.accel import choose_accel
from tartarus.sandbox.layout import Layout
from tartarus.sandbox.sandbox import Sandbox
from tartarus.sandbox.saved import pin
from tartarus.snapshots.build import ensure_snapshot
from tartarus.snapshots.pool import VMMPool
from tartarus.snapshots.snapshot import Snapshot
from tartarus.templates.built import get_template

WAKE_PHASES = ("vmm_ready", "state_loaded", "guest_resumed", "first_answer", "run_code")
HIBERNATE_PHASES = ("saved", "filtered", "committed", "vmm_gone")


class _Cycler:
    """One sandbox going to sleep and waking, recording both (`snapshot` None: a gVisor sandbox)."""

    def __init__(self, sandbox: Sandbox, snapshot: Snapshot | None, layout: Layout) -> None:
        self.sandbox, self.snapshot, self.layout = sandbox, snapshot, layout
        self.count = 0

    async def cycle(self, own_pages_only: bool, pool: VMMPool | None) -> dict[str, Any]:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        image = await self.sandbox.hibernate(
            self.snapshot, self.layout, timings=timings, own_pages_only=own_pages_only
        )
        hibernate_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        prepared = pool.take() if pool is not None else None
        self.sandbox, self.snapshot = await Sandbox.wake(image, self.layout, image.spec, prepared=prepared)
        answer = await (await self.sandbox.code_interpreter()).run_code("n += 1; n")
        wake_s = time.perf_counter() - t1
        self.count += 1
        if answer.result != str(self.count):
            raise RuntimeError(
                f"woken sandbox lost its memory: counter {answer.result}, expected {self.count}"
            )
        wake = dict(self.sandbox.timings)
        wake["run_code"] = wake_s
        return {
            "hibernate_s": hibernate_s,
            "wake_s": wake_s,
            "state_bytes": image.state_bytes,
            "layer_bytes": image.layer_bytes,
            "hibernate_phases": timings,
            "wake_phases": wake,
        }


async def _start(snapshot: Snapshot | None, template: str, layout: Layout, dirty_mib: int) -> _Cycler:
    if snapshot is None:
        sandbox = await Sandbox.start_gvisor(get_template(template), layout.sandboxes)
    else:
        sandbox = await Sandbox.restore(snapshot, get_template(snapshot.template), layout.sandboxes)
    setup = f"import os\nballast = os.urandom({dirty_mib} << 20)\nn = 0"
    await (await sandbox.code_interpreter()).run_code(setup)
    return _Cycler(sandbox, snapshot, layout)


def _phases(cycles: list[dict[str, Any]], key: str, names: tuple[str, ...]) -> dict[str, Any]:
    """Each phase every cycle recorded (a gVisor wake has no separate resume, its capture no filter)."""
    return {p: summary_ms([c[key][p] for c in cycles]) for p in names if all(p in c[key] for c in cycles)}


def _summarise(cycles: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    return {
        "concurrency": concurrency,
        "wake": {
            **summary_ms([c["wake_s"] for c in cycles]),
            "phases_cumulative": _phases(cycles, "wake_phases", WAKE_PHASES),
        },
        "hibernate": {
            **summary_ms([c["hibernate_s"] for c in cycles]),
            "phases_cumulative": _phases(cycles, "hibernate_phases", HIBERNATE_PHASES),
            "state_bytes_mean": round(sum(c["state_bytes"] for c in cycles) / len(cycles)),
            "layer_bytes_mean": round(sum(c["layer_bytes"] for c in cycles) / len(cycles)),
        },
    }


async def _rounds(
    snapshot: Snapshot | None,
    template: str,
    samples: int,
    concurrency: int,
    dirty_mib: int,
    own_pages_only: bool,
    progress: Callable[[int], None],
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-") as tmp:
        layout = Layout(Path(tmp))
        layout.sandboxes.mkdir()
        starts = (_start(snapshot, template, layout, dirty_mib) for _ in range(concurrency))
        cyclers = await asyncio.gather(*starts)
        pool = None
        if snapshot is not None:
            # On a filesystem with reflinks, wakes take spares mapping a clone of the pinned memory (lazy).
            vm_template = get_template(snapshot.template)
            lazy = reflink.supported(layout.sandboxes)
            memory_from = pin(snapshot, vm_template, layout.pins)[0].memory if lazy else None
            pool = VMMPool(snapshot, vm_template, layout.sandboxes, size=concurrency, memory_from=memory_from)
        cycles: list[dict[str, Any]] = []
        try:
            while len(cycles) < samples:
                if pool is not None:
                    await wait_full(pool)
                n = min(concurrency, samples - len(cycles))
                cycles += await asyncio.gather(*(c.cycle(own_pages_only, pool) for c in cyclers[:n]))
                if pool is not None:
                    pool.refill()
                progress(n)
        finally:
            if pool is not None:
                await pool.close()
            await asyncio.gather(*(c.sandbox.destroy() for c in cyclers), return_exceptions=True)
    return _summarise(cycles, concurrency)


BACKENDS = ("vm", "gvisor")  # the VM is the host's (kvm or tcg), named so in the results


async def bench_sleep(
    template_name: str,
    samples: int,
    concurrency: int,
    dirty_mib: int,
    baseline_samples: int,
    progress: Callable[[int], None],
    backends: tuple[str, ...] = ("vm",),
) -> dict[str, Any]:
    """Hibernate + wake cycles: sequential, at `concurrency`, and (VMs) the unfiltered-stream baseline,
    on each of `backends`. One backend: its figures at the top level; several: under `backends`, by
    name, the first one's also at the top level."""
    per: dict[str, dict[str, Any]] = {}
    for backend in backends:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: one of {', '.join(BACKENDS)}")
        name = backend if backend == "gvisor" else choose_accel(kernel_path())
        per[name] = await _bench_one(backend, template_name, samples, concurrency, dirty_mib,
                                     baseline_samples, progress)  # fmt: skip
    first = next(iter(per.values()))
    if len(per) == 1:
        return {**first, "backend": next(iter(per))}
    return {**first, "backends": per}


async def _bench_one(
    backend: str,
    template_name: str,
    samples: int,
    concurrency: int,
    dirty_mib: int,
    baseline_samples: int,
    progress: Callable[[int], None],
) -> dict[str, Any]:
    snapshot = ensure_snapshot(get_template(template_name)) if backend == "vm" else None
    sequential = await _rounds(snapshot, template_name, samples, 1, dirty_mib, True, progress)
    result: dict[str, Any] = {
        "template": template_name,
        "dirty_mib": dirty_mib,
        "sequential": sequential,
    }
    if concurrency > 1:
        result["concurrent"] = await _rounds(
            snapshot, template_name, samples, concurrency, dirty_mib, True, progress
        )
    if baseline_samples and snapshot is not None:
        result["baseline_full_stream"] = await _rounds(
            snapshot, template_name, baseline_samples, 1, dirty_mib, False, progress
        )
    if snapshot is None:
        result["what"] = (
            "a gVisor python-ds sandbox (restored from the template's warm image) holding dirty_mib of "
            "its own memory, hibernated (runsc checkpoint --leave-running, uncompressed, into a staging "
            "directory (saved) → commit → container killed, its network and cgroup removed (vmm_gone)) "
            "and woken (new network, cgroup and runsc create (vmm_ready) → runsc restore (state_loaded) "
            "→ the interpreter adopted) until run_code answers with its counter"
        )
        return result
    result["what"] = (
        "a restored python-ds sandbox holding dirty_mib of its own memory, hibernated (pause → QEMU's "
        "device state without RAM (saved) → the pages it owns, per its VMM's page table, copied from the "
        "VMM to disk with O_DIRECT and one fdatasync (filtered) → commit → VMM gone) and woken (new VMM, "
        "owned pages copied into its RAM over the pinned template memory, device state loaded, resumed) "
        "until run_code answers with its counter; baseline_full_stream keeps every guest page (plain QEMU "
        "save/restore to a file, through the stream filter)"
    )
    return result
