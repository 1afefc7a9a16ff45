"""Hibernate, wake, checkpoint and fork: each a few steps with one commit point, so a failure at any
step leaves the sandbox running (rolled back) or cleanly captured (rolled forward), never half.

Hibernation commits when its image directory is renamed into `<state>/hibernated/`; a wake commits
when that directory is renamed to `<state>/sandboxes/.<id>.waking`, after its state is loaded and
before the guest runs again, so an image is never reused once its guest has moved on. Just before the
guest resumes, the waking directory is marked `resumed`: a daemon that dies between the two leaves an
image that is still exactly the sandbox, which the next daemon puts back (`recover_wakes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tartarus import failpoints
from tartarus.errors import InsufficientStorage, InvalidArgument, QuotaExceeded, SandboxFailed
from tartarus.hibernation.capture import capture, fsync_path
from tartarus.hibernation.image import META, Image, allocated_bytes, pin, pinned, publish
from tartarus.private import PRIVATE_DIR, PRIVATE_FILE
from tartarus.runtime.disks import sparse_copy
from tartarus.runtime.sandbox import (
    LAYER_DRIVE,
    RuntimeSandbox,
    SandboxOptions,
    new_sandbox_id,
    reap_workdir,
)
from tartarus.sealing import EnvSeal
from tartarus.snapshots.restore import GuestState, prepare, restore
from tartarus.snapshots.store import Snapshot

log = logging.getLogger(__name__)

LAYER = "rw.ext4"  # a running sandbox's writable layer, in its working directory
RESUMED = "resumed"  # in a waking image: its guest may have run since, so the image is stale


@dataclass(frozen=True)
class Layout:
    """Where a daemon keeps sandboxes in each state, all on one filesystem so moves are renames."""

    state_dir: Path

    @property
    def sandboxes(self) -> Path:
        return self.state_dir / "sandboxes"

    @property
    def hibernated(self) -> Path:
        return self.state_dir / "hibernated"

    @property
    def checkpoints(self) -> Path:
        return self.state_dir / "checkpoints"

    @property
    def pins(self) -> Path:
        return self.state_dir / "pins"

    @functools.cached_property
    def seal(self) -> EnvSeal:
        """What seals the env in image records (and sandbox descriptors): the state dir's key."""
        return EnvSeal.for_state_dir(self.state_dir)


def _capturable(sandbox: RuntimeSandbox, snapshot: Snapshot | None) -> Snapshot:
    vm = sandbox.vm
    if snapshot is None or vm is None or vm.config.memory_file is None:
        raise InvalidArgument(
            f"sandbox {sandbox.id} was booted, not restored from a template snapshot: "
            "only snapshot-restored sandboxes can be hibernated or checkpointed"
        )
    if not vm.running:
        raise SandboxFailed(f"sandbox {sandbox.id} has stopped: {vm.exit_message}")
    return snapshot


def _image(sandbox: RuntimeSandbox, snapshot: Snapshot, path: Path, kind: str, id_: str) -> Image:
    """The image's metadata; the template is the pinned one so the image outlives cache clean-ups."""
    return Image(
        path=path,
        kind=kind,
        id=id_,
        sandbox_id=sandbox.id,
        template=sandbox.template,
        snapshot_key=snapshot.key,
        interpreter_pid=sandbox.interpreter.pid if sandbox.interpreter else None,
        vcpus=snapshot.vcpus,
        memory_mib=snapshot.memory_mib,
        env=dict(sandbox.options.env),
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
    """Refuse before writing when the images already use the quota (an image costs at most its RAM)."""
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
    sandbox: RuntimeSandbox,
    snapshot: Snapshot | None,
    layout: Layout,
    quota_bytes: int | None = None,
    *,
    timings: dict[str, float] | None = None,
    own_pages_only: bool = True,
    request: dict[str, Any] | None = None,
) -> Image:
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
        _, template = pin(snapshot, sandbox.template, layout.pins)
        failpoints.hit("hibernate.pinned")
        before = time.perf_counter() - t0
        captured = await capture(
            vm, vm.config.memory_file, staging / "memory.state", own_pages_only=own_pages_only
        )
        timings["saved"] = before + captured.seconds_save  # paused, QEMU's stream written
        timings["filtered"] = time.perf_counter() - t0
        failpoints.hit("hibernate.captured")
        fsync_path(layer)  # QEMU flushed its writes when it stopped; make them ours on disk
        os.rename(layer, staging / "layer.ext4")
        moved = True
        failpoints.hit("hibernate.layer_moved")
        image = _image(sandbox, snapshot, staging, "hibernation", sandbox.id)
        image = dataclasses.replace(image, template=template, request=request or {})
        image = publish(image, layout.hibernated / sandbox.id, layout.seal)
        timings["committed"] = time.perf_counter() - t0
    except BaseException as error:
        if moved:
            os.rename(staging / "layer.ext4", layer)
        shutil.rmtree(staging, ignore_errors=True)
        if vm.running:
            with contextlib.suppress(Exception):
                await vm.resume()
        if _disk_full(error):
            raise _storage_error(layout, sandbox.id, "hibernate") from error
        raise
    try:
        failpoints.hit("hibernate.committed")
    finally:  # committed: whatever happens now, the image is the sandbox
        await sandbox.destroy()
    timings["vmm_gone"] = time.perf_counter() - t0
    return image


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

    One not marked `resumed` is still the whole sandbox (its guest never ran; the VMM that loaded it is
    reaped with the other leftovers), so it goes back to `hibernated/`: deleting it, as reaping the
    sandboxes directory would, destroyed a sandbox nothing had touched. One marked `resumed` had its
    memory only in that VMM, which cannot be taken over (it was never described), so it is lost."""
    restored: list[str] = []
    lost: list[str] = []
    if not layout.sandboxes.exists():
        return restored, lost
    for waking in sorted(layout.sandboxes.glob(".*.waking")):
        sandbox_id = waking.name[1 : -len(".waking")]
        whole = all((waking / name).exists() for name in (META, "memory.state", "layer.ext4"))
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


async def start_from(
    image: Image,
    layout: Layout,
    options: SandboxOptions,
    *,
    wake: bool,
    prepared: RuntimeSandbox | None = None,
) -> tuple[RuntimeSandbox, Snapshot]:
    """A running sandbox from `image`: the same sandbox (wake) or a new one (fork of a checkpoint),
    with the (pinned) snapshot under it, which a later capture of it needs. `prepared` is a pooled VMM
    of the same snapshot, waiting for incoming state; without one, a VMM is started."""
    try:
        snapshot = pinned(layout.pins, image.snapshot_key)
    except FileNotFoundError:
        raise SandboxFailed(
            f"{image.kind} {image.id}: the snapshot it was captured from ({image.snapshot_key}) is gone"
        ) from None
    options = dataclasses.replace(
        options, vcpus=image.vcpus, memory_mib=image.memory_mib, env={**image.env, **options.env}
    )
    sandbox_id = image.id if wake else new_sandbox_id()
    workdir = layout.sandboxes / sandbox_id
    if wake and workdir.exists() and (prepared is None or prepared.workdir != workdir):
        reap_workdir(workdir)  # what a failed earlier wake left; the image itself is intact
    # A waking image moves here when it commits: out of hibernated/, so no one reuses it once its guest
    # may have run, yet outside the working directory a failed restore deletes (see `recover_wakes`).
    waking = layout.sandboxes / f".{sandbox_id}.waking"
    committed = False

    def commit() -> None:
        nonlocal committed
        if wake:
            os.rename(image.path, waking)
            fsync_path(image.path.parent)
            committed = True
            failpoints.hit("wake.committed")
            (waking / RESUMED).touch(mode=PRIVATE_FILE)  # from here a crash cannot tell whether the guest ran
            fsync_path(waking)

    t0 = time.perf_counter()
    if prepared is None:
        prepared = await prepare(
            snapshot,
            image.template,
            layout.sandboxes,
            options,
            sandbox_id=sandbox_id,
            layer=image.layer if wake else None,
            layer_source=None if wake else image.layer,
        )
    else:
        try:
            await _take_over(prepared, image, sandbox_id, wake)
        except BaseException:
            await prepared.destroy()
            raise
    vmm_ready = time.perf_counter() - t0
    state = GuestState(image.state, image.interpreter_pid, new_identity=not wake)
    try:
        sandbox = await restore(snapshot, image.template, layout.sandboxes, options, prepared, state, commit)
        failpoints.hit("wake.resumed")  # its guest runs; its layer is still in the waking image
    except BaseException:
        if committed and "guest_resumed" not in prepared.timings:  # the guest never ran: undo
            (waking / RESUMED).unlink(missing_ok=True)
            os.rename(waking, image.path)
        elif committed:
            with contextlib.suppress(Exception):
                await prepared.destroy()  # idempotent: a failed restore destroyed it already
            shutil.rmtree(waking, ignore_errors=True)
            log.error("sandbox %s failed while waking, after its guest resumed: it is lost", sandbox_id)
        raise
    sandbox.timings = {k: v + vmm_ready for k, v in sandbox.timings.items() if k != "pooled"}
    sandbox.timings["vmm_ready"] = vmm_ready
    if wake:
        sandbox.created_at = image.created_at
        _relocate_layer(sandbox, waking / "layer.ext4")
        shutil.rmtree(waking, ignore_errors=True)
    return sandbox, snapshot


def _relocate_layer(sandbox: RuntimeSandbox, path: Path) -> None:
    """Move the layer QEMU has open (at `path`) to its place in the working directory."""
    assert sandbox.vm is not None
    drives = sandbox.vm.config.drives
    os.rename(path, sandbox.workdir / LAYER)
    drives[LAYER_DRIVE] = dataclasses.replace(drives[LAYER_DRIVE], path=sandbox.workdir / LAYER)


async def _take_over(prepared: RuntimeSandbox, image: Image, sandbox_id: str, wake: bool) -> None:
    """Give a pooled VMM (waiting with a fresh layer of its own) the image's layer: the hibernated
    sandbox's own file for a wake, a copy of the checkpoint's for a fork."""
    assert prepared.vm is not None
    fresh = prepared.workdir / LAYER
    if wake:
        layer = image.layer
    else:
        layer = prepared.workdir / "incoming.ext4"
        sparse_copy(image.layer, layer)
    await prepared.vm.replace_drive(LAYER_DRIVE, layer)
    fresh.unlink()
    if not wake:
        _relocate_layer(prepared, layer)
    prepared.id = sandbox_id


def touch(image: Image) -> None:
    """Mark a checkpoint used now: its time-to-live counts from its last use."""
    os.utime(image.path)


def expired(image: Image, now: float | None = None) -> bool:
    if image.ttl_s is None:
        return False
    return (now or time.time()) - image.path.stat().st_mtime > image.ttl_s


async def checkpoint(
    sandbox: RuntimeSandbox,
    snapshot: Snapshot | None,
    layout: Layout,
    checkpoint_id: str,
    ttl_s: float | None = None,
    quota_bytes: int | None = None,
    *,
    request: dict[str, Any] | None = None,
) -> Image:
    """Capture a running sandbox to `<state>/checkpoints/<id>` and let it run on."""
    snapshot = _capturable(sandbox, snapshot)
    vm = sandbox.vm
    assert vm is not None and vm.config.memory_file is not None
    _check_quota(layout, quota_bytes, snapshot.memory_mib)
    layout.checkpoints.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    staging = layout.checkpoints / f".{checkpoint_id}.staging"
    try:
        staging.mkdir(mode=PRIVATE_DIR)
        _, template = pin(snapshot, sandbox.template, layout.pins)
        try:
            await capture(vm, vm.config.memory_file, staging / "memory.state")
            sparse_copy(sandbox.workdir / LAYER, staging / "layer.ext4")  # paused: consistent with RAM
        finally:
            if vm.running:
                await vm.resume()
        image = _image(sandbox, snapshot, staging, "checkpoint", checkpoint_id)
        image = dataclasses.replace(image, template=template, ttl_s=ttl_s, request=request or {})
        return publish(image, layout.checkpoints / checkpoint_id, layout.seal)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if _disk_full(error):
            raise _storage_error(layout, sandbox.id, "checkpoint") from error
        raise
