"""Readiness: can this daemon serve a create right now? (`GET /v1/health?ready=true`)

Liveness (plain `/v1/health`) only says the process answers. Readiness checks what every create needs:
the store answers a trivial query within a short timeout, the state directory takes a new file, the
guest kernel and agent initramfs are built, and at least one template has a snapshot to restore. A load
balancer probes it without a key, so failure messages name the check and the cause, never a path, a
database URL or a stack trace.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from tartarus.errors import TartarusError

STORE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    message: str = ""


def _state_dir_writable(state_dir: Path) -> Check:
    try:
        fd, name = tempfile.mkstemp(prefix=".ready.", dir=state_dir)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as e:
        return Check("state_dir", False, f"the state directory does not take a new file: {e.strerror}")
    return Check("state_dir", True)


def _guest_built() -> Check:
    from tartarus.bootfiles.initramfs import initramfs_path
    from tartarus.bootfiles.kernel import kernel_path

    try:
        kernel_path()
        initramfs_path()
    except TartarusError as e:
        return Check("guest", False, e.message)
    return Check("guest", True)


def _snapshot_usable() -> Check:
    from tartarus.snapshots.snapshot import find_snapshot
    from tartarus.templates.built import list_templates

    try:
        for template in list_templates():
            if not template.snapshotted:
                continue
            snapshot = find_snapshot(template)
            if snapshot is not None and snapshot.memory.is_file() and snapshot.state.is_file():
                return Check("snapshot", True)
    except (TartarusError, OSError, ValueError) as e:
        return Check("snapshot", False, f"the template snapshots cannot be read: {type(e).__name__}")
    return Check("snapshot", False, "no template has a usable snapshot: run `tartarus template build NAME`")


async def check(state_dir: Path, ping_store: Callable[[], Awaitable[None]]) -> list[Check]:
    """Every readiness check, in a fixed order. Disk work runs off the event loop."""
    try:
        await asyncio.wait_for(ping_store(), STORE_TIMEOUT_S)
        store = Check("store", True)
    except TimeoutError:
        store = Check("store", False, f"the store did not answer within {STORE_TIMEOUT_S:g} s")
    except Exception as e:  # any driver error: the point is that creates would fail too
        store = Check("store", False, f"the store does not answer: {type(e).__name__}")
    state, guest, snapshot = await asyncio.gather(
        asyncio.to_thread(_state_dir_writable, state_dir),
        asyncio.to_thread(_guest_built),
        asyncio.to_thread(_snapshot_usable),
    )
    return [store, state, guest, snapshot]
