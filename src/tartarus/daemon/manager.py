"""The daemon's sandbox table: creates, finds, and destroys runtime sandboxes, and cleans up after crashes.

A daemon owns its state directory exclusively (an flock), so two daemons never reap each other's VMs;
on start it reaps whatever a previous owner of the directory left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tartarus.errors import Conflict, InvalidArgument, NotFound
from tartarus.runtime.sandbox import RuntimeSandbox, SandboxOptions, reap_leftovers
from tartarus.snapshots.pool import VMMPool
from tartarus.snapshots.restore import compatible, restore
from tartarus.snapshots.store import find_snapshot
from tartarus.templates.store import Template, get_template, list_templates

log = logging.getLogger(__name__)


def _pool_size_from_env() -> int:
    raw = os.environ.get("TARTARUS_POOL_SIZE", "2")
    try:
        size = int(raw)
    except ValueError:
        size = -1
    if not 0 <= size <= 64:
        raise InvalidArgument(f"TARTARUS_POOL_SIZE must be an integer from 0 to 64, not {raw!r}")
    return size


@dataclass(frozen=True)
class DaemonConfig:
    # Pre-started VMMs kept per template snapshot; 0 disables the pool (creates only get slower).
    pool_size: int = field(default_factory=_pool_size_from_env)


@dataclass
class SandboxRecord:
    runtime: RuntimeSandbox
    state: str  # "running" | "failed"
    error: str | None = None


class SandboxManager:
    def __init__(self, state_dir: Path, config: DaemonConfig | None = None) -> None:
        self.state_dir = state_dir
        self.config = config or DaemonConfig()
        self._pools: dict[str, VMMPool] = {}
        self.sandboxes_dir = state_dir / "sandboxes"
        self._records: dict[str, SandboxRecord] = {}
        self._lock_file: IO[str] | None = None

    def open(self) -> list[str]:
        """Take ownership of the state directory and reap leftovers. Returns the ids reaped."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock = (self.state_dir / "daemon.lock").open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise Conflict(f"another tartarus daemon owns {self.state_dir}") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock_file = lock
        reaped = reap_leftovers(self.sandboxes_dir)
        if reaped:
            log.warning("reaped %d sandboxes left by a previous daemon: %s", len(reaped), ", ".join(reaped))
        self.sandboxes_dir.mkdir(exist_ok=True)
        return reaped

    def start_pools(self) -> None:
        """Pre-start VMMs for every template that has a snapshot (call from the event loop)."""
        for template in list_templates():
            self._pool_for(template)

    def _pool_for(self, template: Template) -> VMMPool | None:
        snapshot = find_snapshot(template) if template.snapshotted else None
        if snapshot is None or self.config.pool_size <= 0:
            return None
        pool = self._pools.get(snapshot.key)
        if pool is None:
            pool = VMMPool(snapshot, template, self.sandboxes_dir, self.config.pool_size)
            self._pools[snapshot.key] = pool
        return pool

    @property
    def pooled(self) -> int:
        return sum(len(p) for p in self._pools.values())

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()
        await asyncio.gather(*(self.destroy(id_) for id_ in list(self._records)), return_exceptions=True)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def create(self, template_name: str, options: SandboxOptions) -> SandboxRecord:
        template = get_template(template_name)
        snapshot = find_snapshot(template) if template.snapshotted else None
        if snapshot is not None and compatible(snapshot, options):
            pool = self._pool_for(template)
            prepared = pool.take() if pool is not None else None
            try:
                runtime = await restore(snapshot, template, self.sandboxes_dir, options, prepared)
            finally:
                if pool is not None:
                    pool.refill()
        else:
            runtime = await RuntimeSandbox.boot(template, self.sandboxes_dir, options)
        record = SandboxRecord(runtime, "running")
        self._records[runtime.id] = record
        assert runtime.vm is not None
        runtime.vm.on_exit = lambda vm: self._vm_exited(record)
        return record

    def _vm_exited(self, record: SandboxRecord) -> None:
        if record.runtime.id in self._records and record.state == "running":
            record.state = "failed"
            vm = record.runtime.vm
            record.error = vm.exit_message if vm else "VM exited"
            log.warning("sandbox %s failed: %s", record.runtime.id, record.error)

    def get(self, id_: str) -> SandboxRecord:
        record = self._records.get(id_)
        if record is None:
            raise NotFound(f"no sandbox {id_!r}")
        return record

    def list(self) -> list[SandboxRecord]:
        return list(self._records.values())

    async def destroy(self, id_: str) -> None:
        record = self._records.pop(id_, None)
        if record is None:
            raise NotFound(f"no sandbox {id_!r}")
        record.state = "destroyed"
        with contextlib.suppress(Exception):
            await record.runtime.destroy()
