"""Hibernate, checkpoint and wake (or copy) a gVisor sandbox through `runsc checkpoint` / `runsc restore`,
with the commit points of the VM path (`tartarus.sandbox.capture`).

A runsc image holds the whole sandbox: memory, processes and its writable overlay (runsc saves the
overlay's file store in it), so a capture is one directory, `<saved>/gvisor/`, and nothing of the
sandbox's working directory need survive it. The capture is taken with `--leave-running`: until the
saved sandbox is published (the commit point, as for a VM) the sandbox runs on with its channel, so a
failure, or a daemon killed, before it leaves it running; after it, the sandbox is destroyed and its
saved sandbox is the sandbox. What its processes do between the capture and the destroy (a few ms, no
call in progress: the daemon holds its lock) is not in the image.

A wake commits when the saved sandbox is renamed to `<sandboxes>/.<id>.waking`, after the container
is created and before `runsc restore`. Unlike a VM's layer, a runsc image is never written by the
sandbox restored from it, so a wake that fails at any step, or a daemon that dies during one, puts the
saved sandbox back whole (`capture.recover_wakes`): it is never lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from tartarus import failpoints
from tartarus.errors import SandboxFailed
from tartarus.gvisor.container import GvisorContainer
from tartarus.gvisor.spec import BundleSpec
from tartarus.hibernation.capture import fsync_path
from tartarus.private import PRIVATE_DIR
from tartarus.runtime.agent import AgentClient
from tartarus.runtime.interpreter import CodeInterpreter
from tartarus.sandbox.capture import _check_quota, raise_undone
from tartarus.sandbox.layout import Layout
from tartarus.sandbox.reap import reap_workdir
from tartarus.sandbox.saved import GVISOR_IMAGE, SavedSandbox, allocated_bytes, publish
from tartarus.sandbox.spec import SandboxSpec
from tartarus.templates.built import Template

SNAPSHOT_KEY = "gvisor"  # a gVisor capture is over no VM snapshot: it pins none


class Sandbox(Protocol):
    """What these steps use of a gVisor sandbox (`tartarus.sandbox.sandbox.Sandbox`)."""

    id: str
    template: Template
    workdir: Path
    spec: SandboxSpec
    created_at: float
    container: GvisorContainer | None
    interpreter: CodeInterpreter | None
    timings: dict[str, float]

    @property
    def agent(self) -> AgentClient: ...

    @property
    def exit_message(self) -> str: ...

    async def _gvisor_container(self, spec: BundleSpec) -> GvisorContainer: ...

    async def destroy(self) -> None: ...


def _running(sandbox: Sandbox) -> None:
    container = sandbox.container
    if container is None or not container.running or container.agent is None:
        raise SandboxFailed(f"sandbox {sandbox.id} has stopped: {sandbox.exit_message}")


def _saved(sandbox: Sandbox, path: Path, kind: str, id_: str) -> SavedSandbox:
    assert sandbox.container is not None
    template = sandbox.template
    return SavedSandbox(
        path=path,
        kind=kind,
        id=id_,
        sandbox_id=sandbox.id,
        template=template,
        snapshot_key=SNAPSHOT_KEY,
        interpreter_pid=sandbox.interpreter.pid if sandbox.interpreter else None,
        vcpus=sandbox.spec.vcpus or template.vcpus,
        memory_mib=sandbox.spec.memory_mib or template.memory_mib,
        spec=sandbox.spec,
        created_at=sandbox.created_at,
        captured_at=time.time(),
        state_bytes=allocated_bytes(path / GVISOR_IMAGE),
        layer_bytes=0,  # the writable overlay is in the image
        bundle=sandbox.container.spec,
    )


async def _capture(sandbox: Sandbox, layout: Layout, quota_bytes: int | None, staging: Path) -> None:
    _running(sandbox)
    assert sandbox.container is not None
    _check_quota(layout, quota_bytes, sandbox.spec.memory_mib or sandbox.template.memory_mib)
    staging.mkdir(mode=PRIVATE_DIR)
    failpoints.hit("hibernate.pinned")
    await sandbox.container.checkpoint(staging / GVISOR_IMAGE, leave_running=True)


async def hibernate(
    sandbox: Sandbox,
    layout: Layout,
    quota_bytes: int | None = None,
    *,
    timings: dict[str, float] | None = None,
    exposed: Any = None,
) -> SavedSandbox:
    """Capture the sandbox to `<state>/hibernated/<id>` and destroy it (module docstring)."""
    t0 = time.perf_counter()
    timings = {} if timings is None else timings
    staging = sandbox.workdir / "hibernating"
    try:
        await _capture(sandbox, layout, quota_bytes, staging)
        timings["saved"] = time.perf_counter() - t0
        failpoints.hit("hibernate.captured")
        saved = dataclasses.replace(_saved(sandbox, staging, "hibernation", sandbox.id), exposed=exposed)
        saved = publish(saved, layout.hibernated / sandbox.id, layout.seal)
        timings["committed"] = time.perf_counter() - t0
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise_undone(error, layout, sandbox.id, "hibernate")
    try:
        failpoints.hit("hibernate.committed")
    finally:  # committed: whatever happens now, the saved sandbox is the sandbox
        await sandbox.destroy()
    timings["vmm_gone"] = time.perf_counter() - t0
    return saved


async def checkpoint(
    sandbox: Sandbox,
    layout: Layout,
    checkpoint_id: str,
    ttl_s: float | None = None,
    quota_bytes: int | None = None,
) -> SavedSandbox:
    """Capture a running sandbox to `<state>/checkpoints/<id>` and let it run on."""
    layout.checkpoints.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    staging = layout.checkpoints / f".{checkpoint_id}.staging"
    try:
        await _capture(sandbox, layout, quota_bytes, staging)
        saved = dataclasses.replace(_saved(sandbox, staging, "checkpoint", checkpoint_id), ttl_s=ttl_s)
        return publish(saved, layout.checkpoints / checkpoint_id, layout.seal)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise_undone(error, layout, sandbox.id, "checkpoint")


def check_saved(saved: SavedSandbox) -> BundleSpec:
    """The container spec `saved` restores with, if what it names on the host is still there."""
    bundle = saved.bundle
    assert bundle is not None
    for what, path in (("template tree", bundle.rootfs), ("guest agent", bundle.agent)):
        if not path.exists():
            raise SandboxFailed(f"{saved.kind} {saved.id}: the {what} it was captured over ({path}) is gone")
    return bundle


def prepare_workdir(layout: Layout, sandbox_id: str, wake: bool) -> Path:
    workdir = layout.sandboxes / sandbox_id
    if wake and workdir.exists():
        reap_workdir(workdir)  # what a failed earlier wake left; the saved sandbox itself is intact
    workdir.mkdir(mode=PRIVATE_DIR, parents=True)
    return workdir


async def start_saved(sandbox: Sandbox, saved: SavedSandbox, layout: Layout, *, wake: bool) -> None:
    """Restore the gVisor sandbox `saved` into `sandbox` (new, in its `prepare_workdir`): the same
    sandbox woken (`wake`), or a new one from a checkpoint, with its own machine-id. Its network,
    cgroups and container are new, as a woken VM's VMM is; the caller contains it. Commits as the
    module docstring says. Destroyed on failure."""
    bundle, spec, sandbox_id = check_saved(saved), sandbox.spec, sandbox.id
    waking = layout.sandboxes / f".{sandbox_id}.waking"
    image, committed = saved.image, False
    t0 = time.perf_counter()
    try:
        container = await sandbox._gvisor_container(bundle)
        await container.create()
        sandbox.timings["vmm_ready"] = time.perf_counter() - t0
        failpoints.hit("restore.loaded")
        if wake:
            os.rename(saved.path, waking)
            fsync_path(saved.path.parent)
            committed, image = True, waking / GVISOR_IMAGE
            failpoints.hit("wake.committed")
        await container.restore(image, spec.boot_timeout)
        sandbox.timings["state_loaded"] = time.perf_counter() - t0
        agent = sandbox.agent
        if not wake:  # a copy is a sandbox of its own; the hostname stays (gVisor denies sethostname)
            await agent.configure(machine_id=uuid.uuid4().hex)
        if saved.interpreter_pid is not None:
            sandbox.interpreter = CodeInterpreter.adopt(agent, saved.interpreter_pid)
            if not wake and spec.env:
                await sandbox.interpreter.set_env(spec.env)
        sandbox.timings["first_answer"] = time.perf_counter() - t0
        failpoints.hit("wake.resumed")
    except BaseException:
        with contextlib.suppress(Exception):
            await sandbox.destroy()
        if committed:  # the image is as it was captured: the saved sandbox is still the sandbox
            os.rename(waking, saved.path)
            fsync_path(saved.path.parent)
        raise
    if wake:
        sandbox.created_at = saved.created_at
        shutil.rmtree(waking, ignore_errors=True)
