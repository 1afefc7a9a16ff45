"""The daemon's one table of sandboxes: a record per sandbox it owns (running, hibernated or failed), and
who owns it (tenant, labels, lifetime). Whoever keeps a durable copy (the control plane's store) is
told of every change as it happens (`on_change`), so nothing has to poll for them."""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from tartarus.errors import NotFound
from tartarus.sandbox.sandbox import Sandbox
from tartarus.sandbox.saved import SavedSandbox
from tartarus.sandbox.spec import SandboxSpec
from tartarus.snapshots.snapshot import Snapshot
from tartarus.store import SandboxRow
from tartarus.templates.built import Template

log = logging.getLogger(__name__)

Change = Literal["created", "hibernated", "woken", "failed", "destroyed", "expired"]
ENDED_KEPT = 1000  # why recently ended sandboxes ended, for a clear 404


@dataclass
class SandboxRecord:
    id: str
    template: Template
    spec: SandboxSpec  # what was asked, and by whom (tenant, labels)
    runtime: Sandbox | None  # None while hibernated
    state: str  # "running" | "hibernated" | "failed" | "destroyed"
    snapshot: Snapshot | None = None  # the snapshot it was restored from: what hibernation needs
    saved: SavedSandbox | None = None  # while hibernated
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    timeout_s: float | None = None  # the lifetime it was given (its TTL), for the record
    expires_at: float | None = None
    last_active: float = field(default_factory=time.monotonic)
    busy: int = 0
    connections: int = 0  # open through exposed ports: keep it from idling, not from an explicit hibernate
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def tenant(self) -> str:
        return self.spec.tenant

    @property
    def labels(self) -> Mapping[str, str]:
        return self.spec.labels

    @property
    def idle_timeout(self) -> float | None:
        return self.spec.idle_timeout

    @property
    def timings(self) -> dict[str, float]:
        return self.runtime.timings if self.runtime else {}

    @property
    def started_at(self) -> float:
        """When the sandbox was made: its runtime's clock while it runs, the record's while it hibernates."""
        return self.runtime.created_at if self.runtime else self.created_at

    @property
    def vcpus(self) -> int:
        vm = self.runtime.vm if self.runtime else None
        if vm is None and self.runtime and self.runtime.limits:  # gVisor: its cgroup's, from its limits
            return self.runtime.limits.vcpus
        return vm.config.vcpus if vm else self.saved.vcpus if self.saved else self.template.vcpus

    @property
    def memory_mib(self) -> int:
        vm = self.runtime.vm if self.runtime else None
        if vm:
            return vm.config.memory_mib
        if self.runtime and self.runtime.limits:
            return self.runtime.limits.memory_mib
        return self.saved.memory_mib if self.saved else self.template.memory_mib

    def set_timeout(self, seconds: float | None) -> None:
        self.timeout_s = seconds
        self.expires_at = time.time() + seconds if seconds else None

    def row(self, node: str) -> SandboxRow:
        """The durable record of this sandbox (`tartarus.store`): built here, and only here."""
        return SandboxRow(
            id=self.id,
            tenant=self.tenant,
            node=node,
            template=self.template.name,
            state=self.state,
            vcpus=self.vcpus,
            memory_mib=self.memory_mib,
            created_at=self.started_at,
            labels=dict(self.labels),
            error=self.error,
            timeout_s=self.timeout_s,
            expires_at=self.expires_at,
        )


# Told (record, change, why) after each change; `why` says why a sandbox ended, when the daemon knows.
OnChange = Callable[[SandboxRecord, Change, "str | None"], None]


class SandboxTable:
    def __init__(self) -> None:
        self._records: dict[str, SandboxRecord] = {}
        self._ended: dict[str, str] = {}  # why recently ended sandboxes ended (TTL), for a clear 404
        self.on_change: OnChange = lambda record, change, why: None

    def get(self, id_: str) -> SandboxRecord:
        record = self._records.get(id_)
        if record is None:
            ended = self._ended.get(id_)
            raise NotFound(f"sandbox {id_!r} {ended}" if ended else f"no sandbox {id_!r}")
        return record

    def find(self, id_: str) -> SandboxRecord | None:
        return self._records.get(id_)

    def list(self) -> builtins.list[SandboxRecord]:
        return list(self._records.values())

    def running(self) -> builtins.list[Sandbox]:
        return [r.runtime for r in self._records.values() if r.state == "running" and r.runtime]

    def load(self, record: SandboxRecord) -> None:
        """A sandbox found again at start (hibernated, or taken over): no change to tell."""
        self._records[record.id] = record
        if record.runtime is not None:
            self._watch(record)

    def add(self, record: SandboxRecord) -> SandboxRecord:
        self._records[record.id] = record
        self._watch(record)
        self.changed(record, "created")
        return record

    def remove(self, id_: str) -> SandboxRecord:
        record = self._records.pop(id_, None)
        if record is None:
            raise NotFound(f"no sandbox {id_!r}")
        return record

    def ended(self, record: SandboxRecord, why: str | None = None, change: Change = "destroyed") -> None:
        """`record` is gone (`remove`d and destroyed); `why`, if the daemon ended it, is kept a while."""
        record.state = "destroyed"
        if why is not None:
            self._ended[record.id] = why
            while len(self._ended) > ENDED_KEPT:
                del self._ended[next(iter(self._ended))]
        self.changed(record, change, why)

    def why_ended(self, id_: str) -> str | None:
        """Why a recently ended sandbox ended, if the daemon ended it (its timeout)."""
        return self._ended.get(id_)

    def changed(self, record: SandboxRecord, change: Change, why: str | None = None) -> None:
        try:
            self.on_change(record, change, why)
        except Exception:
            log.exception("could not pass on the change %s of sandbox %s", change, record.id)

    def woken(self, record: SandboxRecord) -> None:
        self._watch(record)
        self.changed(record, "woken")

    def _watch(self, record: SandboxRecord) -> None:
        assert record.runtime is not None and record.runtime.engine is not None
        record.runtime.on_exit(lambda: self._vm_exited(record))

    def _vm_exited(self, record: SandboxRecord) -> None:
        if record.id in self._records and record.state == "running" and not record.lock.locked():
            self.failed(record)

    def failed(self, record: SandboxRecord) -> None:
        record.state = "failed"
        record.error = record.runtime.exit_message if record.runtime else "VM exited"
        log.warning("sandbox %s failed: %s", record.id, record.error)
        self.changed(record, "failed")
