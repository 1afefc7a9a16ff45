"""Take a template's snapshot: boot it, start its warm interpreter, pause, save device state."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from tartarus.errors import InvalidArgument
from tartarus.guest.cache import cached
from tartarus.runtime.disks import create_layer
from tartarus.runtime.interpreter import CodeInterpreter
from tartarus.runtime.sandbox import RuntimeSandbox, SandboxOptions
from tartarus.runtime.vm import MicroVM
from tartarus.snapshots.store import Snapshot, snapshot_key
from tartarus.templates.store import Template

READY_TIMEOUT_S = 900.0


async def _take(template: Template, key: str, out: Path, progress: Callable[[str], None]) -> None:
    sandbox = RuntimeSandbox("template", template, out / "run", SandboxOptions())
    sandbox.workdir.mkdir()
    layer = create_layer(out / "layer.ext4")
    vm = MicroVM(sandbox.vm_config(layer=layer, memory_file=out / "memory", share=True), sandbox.workdir)
    sandbox.vm = vm
    try:
        t0 = time.perf_counter()
        await vm.start()
        await vm.wait_agent(sandbox.options.boot_timeout)
        progress(f"  booted in {time.perf_counter() - t0:.1f} s; starting the interpreter")
        preload = template.preload or []
        interpreter = await CodeInterpreter.start(vm.agent_client(), preload, READY_TIMEOUT_S)
        # Exercise the run_code path once so the guest has every page it needs resident.
        warm = await interpreter.run_code("1+1")
        if warm.result != "2":
            raise RuntimeError(f"interpreter warm-up returned {warm}")
        progress(f"  interpreter ready with {', '.join(preload) or 'nothing'} imported; saving state")
        await vm.save_state(out / "state")
        snapshot = Snapshot(
            key=key,
            path=out,
            template=template.name,
            accel=vm.config.accel,
            vcpus=vm.config.vcpus,
            memory_mib=vm.config.memory_mib,
            interpreter_pid=interpreter.pid,
        )
    finally:
        await vm.kill()  # never resume: with shared RAM a running guest would rewrite the snapshot
    snapshot.write_meta(out)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(sandbox.workdir)


def ensure_snapshot(template: Template, progress: Callable[[str], None] = print) -> Snapshot:
    """The template's snapshot, taken now if it does not exist (cached by every input's hash)."""
    if template.preload is None:
        raise InvalidArgument(f"template {template.name!r} declares no interpreter to snapshot")
    key = snapshot_key(template)
    path = cached("snapshots", key, lambda out: asyncio.run(_take(template, key, out, progress)))
    return Snapshot.load(path)
