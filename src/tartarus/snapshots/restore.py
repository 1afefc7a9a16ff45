"""Create a sandbox by restoring a template snapshot: the hot path of sandbox creation.

Split in two so a pool can do the first half ahead of time: `prepare` (own writable layer, QEMU started
with `-incoming defer`, QMP connected — no guest has run) and `restore` (load device state, resume,
make the clone distinct). Only `restore` is on the create call's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tartarus import failpoints
from tartarus.private import PRIVATE_DIR
from tartarus.runtime.disks import sparse_copy
from tartarus.runtime.interpreter import CodeInterpreter
from tartarus.runtime.sandbox import RuntimeSandbox, SandboxOptions, new_sandbox_id
from tartarus.runtime.vm import MicroVM
from tartarus.snapshots.store import Snapshot
from tartarus.templates.store import Template


def compatible(snapshot: Snapshot, options: SandboxOptions) -> bool:
    """A restore keeps the snapshot's vCPUs and memory; other shapes need a cold boot."""
    return options.vcpus in (None, snapshot.vcpus) and options.memory_mib in (None, snapshot.memory_mib)


@dataclass(frozen=True)
class GuestState:
    """What a prepared VMM loads over the snapshot's memory: the snapshot's own state (a new clone), or
    a captured sandbox's (tartarus.hibernation: the same sandbox waking, or a fork of a checkpoint)."""

    path: Path
    interpreter_pid: int | None
    new_identity: bool = True  # a clone gets its own hostname and machine-id; a woken sandbox keeps its


async def _copy_off_loop(source: Path, layer: Path) -> None:
    """`sparse_copy` on a worker thread: usually under a millisecond, but several on a busy disk, and a
    pool refill runs it while the daemon answers requests. A cancelled caller still waits for the copy
    to end, so the clean-up that follows never races a file being written."""
    copy = asyncio.ensure_future(asyncio.to_thread(sparse_copy, source, layer))
    try:
        await asyncio.shield(copy)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await copy
        raise


async def prepare(
    snapshot: Snapshot,
    template: Template,
    root: Path,
    options: SandboxOptions,
    *,
    nice: int = 0,
    sandbox_id: str | None = None,
    layer_source: Path | None = None,
    layer: Path | None = None,
) -> RuntimeSandbox:
    """A VMM waiting for incoming state. Its writable layer is a sparse copy of `layer_source` (default:
    the snapshot's), or the existing file `layer` used in place (a hibernated sandbox's)."""
    sandbox = RuntimeSandbox(sandbox_id or new_sandbox_id(), template, root / "pending", options)
    sandbox.workdir = root / sandbox.id
    sandbox.workdir.mkdir(mode=PRIVATE_DIR, parents=True)
    try:
        t0 = time.perf_counter()
        if layer is None:
            layer = sandbox.workdir / "rw.ext4"
            await _copy_off_loop(layer_source or snapshot.layer, layer)
        await sandbox.attach_network()
        sandbox.attach_cgroup()
        config = sandbox.vm_config(layer=layer, memory_file=snapshot.memory, share=False)
        config.incoming = True
        sandbox.vm = MicroVM(config, sandbox.workdir)
        await sandbox.vm.start(nice=nice)
        sandbox.timings["vmm_ready"] = time.perf_counter() - t0
    except BaseException:
        await sandbox.destroy()
        raise
    return sandbox


async def restore(
    snapshot: Snapshot,
    template: Template,
    root: Path,
    options: SandboxOptions,
    prepared: RuntimeSandbox | None = None,
    state: GuestState | None = None,
    on_loaded: Callable[[], None] | None = None,
) -> RuntimeSandbox:
    """Bring a (possibly pre-started) VMM to a running, distinct clone of the snapshot (or to `state`)."""
    t0 = time.perf_counter()
    state = state or GuestState(snapshot.state, snapshot.interpreter_pid)
    sandbox = prepared or await prepare(snapshot, template, root, options)
    sandbox.options = options  # a pooled VMM was prepared before this request's options were known
    sandbox.created_at = time.time()
    sandbox.timings = {
        "vmm_ready": 0.0 if prepared else time.perf_counter() - t0,
        "pooled": float(bool(prepared)),
    }
    vm = sandbox.vm
    assert vm is not None
    try:
        if prepared is not None:
            vm.set_priority(0)
            sandbox.attach_cgroup()  # a pooled VMM was started before this request's limits were known
        await vm.load_state(state.path)
        failpoints.hit("restore.loaded")
        if on_loaded is not None:
            on_loaded()  # the last moment at which no guest has run: a wake commits here
        sandbox.timings["state_loaded"] = time.perf_counter() - t0
        await vm.resume()
        sandbox.timings["guest_resumed"] = time.perf_counter() - t0
        agent = vm.agent_client()
        agent.assume_running()
        # Clones share the snapshot's clock, RNG pool, hostname and machine-id until told otherwise; a
        # woken sandbox keeps its names but its clock stopped and its entropy was seen on disk.
        await agent.configure(
            time_ns=time.time_ns(),
            entropy=os.urandom(64),
            hostname=sandbox.id if state.new_identity else None,
            machine_id=uuid.uuid4().hex if state.new_identity else None,
        )
        if state.interpreter_pid is not None:  # after CONFIGURE told the agent's version (its credit)
            sandbox.interpreter = CodeInterpreter.adopt(agent, state.interpreter_pid)
        sandbox.timings["first_answer"] = time.perf_counter() - t0
    except BaseException:
        await sandbox.destroy()
        raise
    return sandbox
