"""Hibernate, wake, checkpoint and fork: each a few steps with one commit point, so a failure at any
step leaves the sandbox running (rolled back) or cleanly captured (rolled forward), never half.
Capturing (hibernate, checkpoint) and cleaning up after a daemon that died mid-way are here; starting
from a capture (wake, copy) is `Sandbox.wake` and `Sandbox.copy`, whose commit point is described below.

Hibernation commits when its saved sandbox directory is renamed into `<state>/hibernated/`; a wake commits
when that directory is renamed to `<state>/sandboxes/.<id>.waking`, after its state is loaded and
before the guest runs again, so a saved sandbox is never reused once its guest has moved on. Just before the
guest resumes, the waking directory is marked `resumed`: a daemon that dies between the two leaves an
saved sandbox that is still exactly the sandbox, which the next daemon puts back (`recover_wakes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, NoReturn, Protocol

from tartarus import failpoints
from tartarus.errors import (
    CaptureFailed,
    InsufficientStorage,
    InvalidArgument,
    QuotaExceeded,
    SandboxFailed,
    TartarusError,
)
from tartarus.hibernation.capture import capture, fsync_path, snapshot_prefix
from tartarus.private import PRIVATE_DIR
from tartarus.runtime.disks import sparse_copy
from tartarus.runtime.interpreter import CodeInterpreter
from tartarus.runtime.vm import MicroVM
from tartarus.sandbox.layout import Layout
from tartarus.sandbox.saved import GVISOR_IMAGE, META, SavedSandbox, allocated_bytes, pin, publish
from tartarus.sandbox.spec import SandboxSpec
from tartarus.snapshots.snapshot import Snapshot
from tartarus.templates.built import Template

log = logging.getLogger(__name__)

LAYER = "rw.ext4"  # a running sandbox's writable layer, in its working directory
RESUMED = "resumed"  # in a waking saved sandbox: its guest may have run since, so the saved sandbox is stale


class Capturable(Protocol):
    """What a capture reads of a running sandbox (`tartarus.sandbox.sandbox.Sandbox`)."""

    id: str
    template: Template
    workdir: Path
    spec: SandboxSpec
    created_at: float
    vm: MicroVM | None
    interpreter: CodeInterpreter | None

    async def destroy(self) -> None: ...


def _capturable(sandbox: Capturable, snapshot: Snapshot | None) -> Snapshot:
    vm = sandbox.vm
    if snapshot is None or vm is None or vm.config.memory_file is None:
        raise InvalidArgument(
            f"sandbox {sandbox.id} was booted, not restored from a template snapshot: "
            "only snapshot-restored sandboxes can be hibernated or checkpointed"
        )
    if not vm.running:
        raise SandboxFailed(f"sandbox {sandbox.id} has stopped: {vm.exit_message}")
    return snapshot


def _saved(sandbox: Capturable, snapshot: Snapshot, path: Path, kind: str, id_: str) -> SavedSandbox:
    """The saved sandbox's metadata; the template is the pinned one, so that it outlives cache clean-ups."""
    return SavedSandbox(
        path=path,
        kind=kind,
        id=id_,
        sandbox_id=sandbox.id,
        template=sandbox.template,
        snapshot_key=snapshot.key,
        interpreter_pid=sandbox.interpreter.pid if sandbox.interpreter else None,
        vcpus=snapshot.vcpus,
        memory_mib=snapshot.memory_mib,
        spec=sandbox.spec,
        created_at=sandbox.created_at,
        captured_at=time.time(),
        state_bytes=allocated_bytes(path / "memory.state"),
        layer_bytes=allocated_bytes(path / "layer.ext4"),
    )


def _disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    return isinstance(error, SandboxFailed) and "No space left on device" in error.message


def _storage_error(layout: Layout, sandbox_id: str, what: str) -> InsufficientStorage:
    free = shutil.disk_usage(layout.state_dir).free
    return InsufficientStorage(
        f"not enough disk space in {layout.state_dir} to {what} sandbox {sandbox_id} "
        f"({free / 2**20:.0f} MiB free); it keeps running and nothing was lost"
    )


def _check_quota(layout: Layout, quota_bytes: int | None, vm_memory_mib: int) -> None:
    """Refuse before writing when saved sandboxes already use the quota (one costs at most its RAM)."""
    if quota_bytes is None:
        return
    used = sum(
        allocated_bytes(f)
        for root in (layout.hibernated, layout.checkpoints)
        if root.exists()
        for f in root.rglob("*")
        if f.is_file()
    )
    if used + vm_memory_mib * 2**20 > quota_bytes:
        raise QuotaExceeded(
            f"hibernation storage quota: {used / 2**20:.0f} MiB of {quota_bytes / 2**20:.0f} MiB used, "
            f"and a capture may need up to {vm_memory_mib} MiB more; the sandbox keeps running"
        )


async def hibernate(
    sandbox: Capturable,
    snapshot: Snapshot | None,
    layout: Layout,
    quota_bytes: int | None = None,
    *,
    timings: dict[str, float] | None = None,
    own_pages_only: bool = True,
    exposed: Any = None,
) -> SavedSandbox:
    """Capture the sandbox to `<state>/hibernated/<id>` and stop its VMM. `timings`, if given, gets
    the cumulative seconds of each phase."""
    t0 = time.perf_counter()
    timings = {} if timings is None else timings
    snapshot = _capturable(sandbox, snapshot)
    vm = sandbox.vm
    assert vm is not None and vm.config.memory_file is not None
    _check_quota(layout, quota_bytes, snapshot.memory_mib)
    staging = sandbox.workdir / "hibernating"
    layer = sandbox.workdir / LAYER
    moved = False
    try:
        staging.mkdir(mode=PRIVATE_DIR)
        pinned, template = pin(snapshot, sandbox.template, layout.pins)
        failpoints.hit("hibernate.pinned")
        before = time.perf_counter() - t0
        captured = await capture(
            vm,
            vm.config.memory_file,
            staging / "memory.state",
            prefix=snapshot_prefix(pinned.state),
            own_pages_only=own_pages_only,
        )
        timings["saved"] = before + captured.seconds_save  # paused, QEMU's stream written
        timings["filtered"] = time.perf_counter() - t0
        failpoints.hit("hibernate.captured")
        fsync_path(layer)  # QEMU flushed its writes when it stopped; make them ours on disk
        os.rename(layer, staging / "layer.ext4")
        moved = True
        failpoints.hit("hibernate.layer_moved")
        saved = _saved(sandbox, snapshot, staging, "hibernation", sandbox.id)
        saved = dataclasses.replace(saved, template=template, exposed=exposed)
        saved = publish(saved, layout.hibernated / sandbox.id, layout.seal)
        timings["committed"] = time.perf_counter() - t0
    except BaseException as error:
        if moved:
            os.rename(staging / "layer.ext4", layer)
        shutil.rmtree(staging, ignore_errors=True)
        if vm.running:
            with contextlib.suppress(Exception):
                await vm.resume()
        raise_undone(error, layout, sandbox.id, "hibernate")
    try:
        failpoints.hit("hibernate.committed")
    finally:  # committed: whatever happens now, the saved sandbox is the sandbox
        await sandbox.destroy()
    timings["vmm_gone"] = time.perf_counter() - t0
    return saved


def raise_undone(error: BaseException, layout: Layout, sandbox_id: str, verb: str) -> NoReturn:
    """Raise what a capture that was undone raises (`_failure`), from `error` when it is another."""
    failure = _failure(error, layout, sandbox_id, verb)
    if failure is error:
        raise error
    raise failure from error


def _failure(error: BaseException, layout: Layout, sandbox_id: str, verb: str) -> BaseException:
    """What a capture that was undone raises: a full disk says so; any other cause that is not already
    one of Tartarus's errors (a stream QEMU wrote that the filter cannot read, a failpoint) becomes a
    clear `CaptureFailed`, its cause logged here, never a bare 500."""
    if _disk_full(error):
        return _storage_error(layout, sandbox_id, verb)
    if isinstance(error, TartarusError) or not isinstance(error, Exception):
        return error
    log.error("%s of %s failed and was undone: %s: %s", verb, sandbox_id, type(error).__name__, error)
    return CaptureFailed(f"{verb} of {sandbox_id} failed and was undone: the sandbox keeps running")


def undo_staging(workdir: Path) -> None:
    """What a daemon that died mid-hibernation (before the commit point) left in a sandbox's directory,
    undone as the failure path of `hibernate` would: the layer back in place, the staging gone."""
    staging = workdir / "hibernating"
    if not staging.exists():
        return
    if (staging / "layer.ext4").exists() and not (workdir / LAYER).exists():
        os.rename(staging / "layer.ext4", workdir / LAYER)
    shutil.rmtree(staging, ignore_errors=True)


def recover_wakes(layout: Layout) -> tuple[list[str], list[str]]:
    """What a daemon that died mid-wake, after its commit point, left: `.<id>.waking` directories.
    Returns the ids put back to hibernation and the ids lost.

    One not marked `resumed` (a gVisor one never is: its image is never written) is still the whole
    sandbox (its guest never ran; the VMM that loaded it is reaped with the other leftovers), so it
    goes back to `hibernated/`: deleting it, as reaping the sandboxes directory would, destroyed a
    sandbox nothing had touched. One marked `resumed` had its
    memory only in that VMM, which cannot be taken over (it was never described), so it is lost."""
    restored: list[str] = []
    lost: list[str] = []
    if not layout.sandboxes.exists():
        return restored, lost
    for waking in sorted(layout.sandboxes.glob(".*.waking")):
        sandbox_id = waking.name[1 : -len(".waking")]
        vm_files = all((waking / name).exists() for name in ("memory.state", "layer.ext4"))
        whole = (waking / META).exists() and (vm_files or (waking / GVISOR_IMAGE).is_dir())
        target = layout.hibernated / sandbox_id
        if whole and not (waking / RESUMED).exists() and not target.exists():
            target.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
            os.rename(waking, target)
            fsync_path(target.parent)
            restored.append(sandbox_id)
        else:
            shutil.rmtree(waking, ignore_errors=True)
            lost.append(sandbox_id)
    return restored, lost


def touch(saved: SavedSandbox) -> None:
    """Mark a checkpoint used now: its time-to-live counts from its last use."""
    os.utime(saved.path)


def expired(saved: SavedSandbox, now: float | None = None) -> bool:
    if saved.ttl_s is None:
        return False
    return (now or time.time()) - saved.path.stat().st_mtime > saved.ttl_s


async def checkpoint(
    sandbox: Capturable,
    snapshot: Snapshot | None,
    layout: Layout,
    checkpoint_id: str,
    ttl_s: float | None = None,
    quota_bytes: int | None = None,
) -> SavedSandbox:
    """Capture a running sandbox to `<state>/checkpoints/<id>` and let it run on."""
    snapshot = _capturable(sandbox, snapshot)
    vm = sandbox.vm
    assert vm is not None and vm.config.memory_file is not None
    _check_quota(layout, quota_bytes, snapshot.memory_mib)
    layout.checkpoints.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    staging = layout.checkpoints / f".{checkpoint_id}.staging"
    try:
        staging.mkdir(mode=PRIVATE_DIR)
        pinned, template = pin(snapshot, sandbox.template, layout.pins)
        try:
            await capture(
                vm, vm.config.memory_file, staging / "memory.state", prefix=snapshot_prefix(pinned.state)
            )
            sparse_copy(sandbox.workdir / LAYER, staging / "layer.ext4")  # paused: consistent with RAM
        finally:
            if vm.running:
                await vm.resume()
        saved = _saved(sandbox, snapshot, staging, "checkpoint", checkpoint_id)
        saved = dataclasses.replace(saved, template=template, ttl_s=ttl_s)
        return publish(saved, layout.checkpoints / checkpoint_id, layout.seal)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise_undone(error, layout, sandbox.id, "checkpoint")
