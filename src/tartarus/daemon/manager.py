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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tartarus.errors import Conflict, NotFound
from tartarus.runtime.sandbox import RuntimeSandbox, SandboxOptions, reap_leftovers
from tartarus.templates.store import get_template

log = logging.getLogger(__name__)


@dataclass
class SandboxRecord:
    runtime: RuntimeSandbox
    state: str  # "running" | "failed"
    error: str | None = None


class SandboxManager:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.sandboxes_dir = state_dir / "sandboxes"
        self._records: dict[str, SandboxRecord] = {}
        self._lock_file: IO[str] | None = None
        self.started_at = time.time()

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

    async def close(self) -> None:
        await asyncio.gather(*(self.destroy(id_) for id_ in list(self._records)), return_exceptions=True)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def create(self, template_name: str, options: SandboxOptions) -> SandboxRecord:
        template = get_template(template_name)
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
