"""Take a template's snapshot: boot it, start its warm interpreter, pause, save device state."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from tartarus.bootfiles.cache import cached
from tartarus.errors import InvalidArgument, Timeout
from tartarus.runtime import jail
from tartarus.runtime.agent import START_ID
from tartarus.runtime.disks import create_layer
from tartarus.runtime.interpreter import CodeInterpreter
from tartarus.sandbox.sandbox import Sandbox
from tartarus.snapshots.snapshot import Snapshot, snapshot_key
from tartarus.templates.built import Template

READY_TIMEOUT_S = 900.0
READY_POLL_S = 0.2


async def _take(template: Template, key: str, out: Path, progress: Callable[[str], None]) -> None:
    sandbox = Sandbox("template", template, out / "run")
    sandbox.workdir.mkdir()
    layer = create_layer(out / "layer.ext4")
    # The snapshot VM has the sandboxes' NIC (its own namespace, policy none: the template's start
    # command gets no network either), so every restore finds the same device with the same address.
    await sandbox.attach_network(secrets.token_hex(6))
    try:
        await _boot_and_save(sandbox, template, key, out, layer, progress)
    finally:
        await sandbox.destroy_network()
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(sandbox.workdir)


async def _boot_and_save(
    sandbox: Sandbox,
    template: Template,
    key: str,
    out: Path,
    layer: Path,
    progress: Callable[[str], None],
) -> None:
    config = sandbox.vm_config(layer=layer, memory_file=out / "memory", share=True)
    t0 = time.perf_counter()
    vm = await sandbox.start_vm(config)
    try:
        progress(f"  booted in {time.perf_counter() - t0:.1f} s")
        agent = vm.agent_client()
        if template.start is not None:
            await _start_service(sandbox, template, progress)
        interpreter = None
        if template.preload is not None:
            interpreter = await CodeInterpreter.start(agent, template.preload, READY_TIMEOUT_S)
            # Exercise the run_code path once so the guest has every page it needs resident.
            warm = await interpreter.run_code("1+1")
            if warm.result != "2":
                raise RuntimeError(f"interpreter warm-up returned {warm}")
            progress(f"  interpreter ready with {', '.join(template.preload) or 'nothing'} imported")
        progress("  saving state")
        await vm.save_state(out / "state")
        snapshot = Snapshot(
            key=key,
            path=out,
            template=template.name,
            accel=vm.config.accel,
            vcpus=vm.config.vcpus,
            memory_mib=vm.config.memory_mib,
            interpreter_pid=interpreter.pid if interpreter else None,
        )
    finally:
        await vm.kill()  # never resume: with shared RAM a running guest would rewrite the snapshot
        if config.jail:
            jail.give_back(config)  # memory file and layer: the daemon's, not a VMM uid's
    snapshot.write_meta(out)


async def _start_service(sandbox: Sandbox, template: Template, progress: Callable[[str], None]) -> None:
    """Start the template's process and poll its ready command until it exits 0."""
    assert template.start is not None
    agent = sandbox.agent
    service = await agent.exec(template.start, env=sandbox.env, cwd=template.workdir, request_id=START_ID)
    service.abandon()  # its output is nobody's: drop it rather than let it fill a queue
    progress(f"  started {' '.join(template.start)} (pid {service.pid})")
    if template.ready is None:
        return
    deadline = time.monotonic() + template.ready_timeout
    while True:
        check = await agent.exec(template.ready, env=sandbox.env, cwd=template.workdir)
        async for _ in check.events():
            pass
        if check.exit is not None and check.exit.exit_code == 0:
            progress("  ready check passed")
            return
        if time.monotonic() > deadline:
            raise Timeout(
                f"template {template.name!r}: ready check still failing after {template.ready_timeout:.0f} s"
            )
        await asyncio.sleep(READY_POLL_S)  # the service is starting in the guest; ask again shortly


def ensure_snapshot(template: Template, progress: Callable[[str], None] = print) -> Snapshot:
    """The template's snapshot, taken now if it does not exist (cached by every input's hash)."""
    if not template.snapshotted:
        raise InvalidArgument(
            f"template {template.name!r} declares no interpreter or start command to snapshot"
        )
    key = snapshot_key(template)
    path = cached("snapshots", key, lambda out: asyncio.run(_take(template, key, out, progress)))
    return Snapshot.load(path)
