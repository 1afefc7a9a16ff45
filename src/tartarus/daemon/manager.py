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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tartarus import audit
from tartarus.errors import Conflict, InvalidArgument, NotFound, PolicyDenied
from tartarus.limits.ttl import Deadlines
from tartarus.policy import Policy, PolicyEngine, load_policy
from tartarus.policy.admission import Admission, admit, contain, create_request
from tartarus.quarantine import actions as quarantine_actions
from tartarus.quarantine.triggers import RefusedPacketsTrigger
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


def _policy_from_env() -> Policy:
    path = os.environ.get("TARTARUS_POLICY")
    return load_policy(Path(path)) if path else Policy()


@dataclass(frozen=True)
class DaemonConfig:
    # Pre-started VMMs kept per template snapshot; 0 disables the pool (creates only get slower).
    pool_size: int = field(default_factory=_pool_size_from_env)
    # Admission rules, limit caps, quarantine settings (TARTARUS_POLICY=FILE; default: admit all).
    policy: Policy = field(default_factory=_policy_from_env)


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
        self.policy = PolicyEngine(self.config.policy)
        self._deadlines = Deadlines()
        self._ended: dict[str, str] = {}  # why recently ended sandboxes ended (TTL), for a clear 404
        self._trigger_task: asyncio.Task[None] | None = None

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
        self._start_triggers()

    def _start_triggers(self) -> None:
        """Runtime quarantine triggers (policy `quarantine.refused_packets`)."""
        settings = self.policy.policy.quarantine
        if settings.refused_packets is None or self._trigger_task is not None:
            return
        trigger = RefusedPacketsTrigger(settings.refused_packets, settings.window_s, self.quarantine)
        self._trigger_task = asyncio.create_task(trigger.run(self._running), name="quarantine-triggers")

    def _running(self) -> list[RuntimeSandbox]:
        return [r.runtime for r in self._records.values() if r.state == "running"]

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
        self._deadlines.cancel_all()
        if self._trigger_task is not None:
            self._trigger_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._trigger_task
            self._trigger_task = None
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()
        await asyncio.gather(*(self.destroy(id_) for id_ in list(self._records)), return_exceptions=True)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def create(
        self,
        template_name: str,
        options: SandboxOptions,
        *,
        tenant: str = "default",
        labels: Mapping[str, str] | None = None,
    ) -> SandboxRecord:
        template = get_template(template_name)
        request = create_request(template, options, tenant, labels)
        try:
            admission = await admit(self.policy, request)
        except PolicyDenied as e:
            audit.record(
                self.state_dir, "sandbox.rejected", tenant=tenant, template=template_name, reason=e.message
            )
            raise
        options.limits = admission.limits
        snapshot = find_snapshot(template) if template.snapshotted else None
        if snapshot is not None and compatible(snapshot, options):
            pool = self._pool_for(template)
            prepared = pool.take() if pool is not None else None
            try:
                runtime = await restore(snapshot, template, self.sandboxes_dir, options, prepared)
                await self._contain(runtime, admission)  # before the refill competes for the CPU
            finally:
                if pool is not None:
                    pool.refill()
        else:
            runtime = await RuntimeSandbox.boot(template, self.sandboxes_dir, options)
            await self._contain(runtime, admission)
        if admission.limits.ttl_s is not None:
            self._deadlines.schedule(runtime.id, admission.limits.ttl_s, lambda: self._expire(runtime.id))
        record = SandboxRecord(runtime, "running")
        self._records[runtime.id] = record
        assert runtime.vm is not None
        runtime.vm.on_exit = lambda vm: self._vm_exited(record)
        return record

    async def _contain(self, runtime: RuntimeSandbox, admission: Admission) -> None:
        """Network policy, quarantine verdict, guest limits; a sandbox that cannot be contained is
        destroyed, never handed out."""
        try:
            await contain(runtime, admission, self.policy.policy.quarantine, self.state_dir)
        except BaseException:
            await runtime.destroy()
            raise

    def _vm_exited(self, record: SandboxRecord) -> None:
        if record.runtime.id in self._records and record.state == "running":
            record.state = "failed"
            vm = record.runtime.vm
            record.error = vm.exit_message if vm else "VM exited"
            log.warning("sandbox %s failed: %s", record.runtime.id, record.error)

    def get(self, id_: str) -> SandboxRecord:
        record = self._records.get(id_)
        if record is None:
            ended = self._ended.get(id_)
            raise NotFound(f"sandbox {id_!r} {ended}" if ended else f"no sandbox {id_!r}")
        return record

    async def _expire(self, id_: str) -> None:
        record = self._records.get(id_)
        if record is None:
            return
        ttl = record.runtime.options.limits.ttl_s if record.runtime.options.limits else None
        why = f"was destroyed: its TTL of {ttl:g} s expired"
        audit.record(self.state_dir, "sandbox.expired", sandbox=id_, ttl_s=ttl)
        log.info("sandbox %s %s", id_, why)
        self._ended[id_] = why
        while len(self._ended) > 1000:
            del self._ended[next(iter(self._ended))]
        with contextlib.suppress(NotFound):
            await self.destroy(id_)

    async def quarantine(self, id_: str, reason: str, by: str = "operator") -> SandboxRecord:
        """Live quarantine (operator or runtime trigger): network cut now, resources clamped."""
        record = self.get(id_)
        settings = self.policy.policy.quarantine
        await quarantine_actions.confine(record.runtime, settings, self.state_dir, reason=reason, by=by)
        return record

    async def expose(self, id_: str, port: int) -> tuple[str, int]:
        """A host address that forwards to `port` of the guest (refused while quarantined)."""
        runtime = self.get(id_).runtime
        if not self.policy.policy.network.expose:
            raise PolicyDenied("exposing guest ports is disabled by this host's policy (network.expose)")
        if runtime.quarantine is not None:
            raise Conflict(f"sandbox {id_} is quarantined: no port can be exposed")
        if runtime.network is None:
            raise Conflict(f"sandbox {id_} has no network namespace")
        return await runtime.network.expose(port)

    async def release(self, id_: str, by: str) -> SandboxRecord:
        record = self.get(id_)
        await quarantine_actions.release(record.runtime, self.state_dir, by=by)
        return record

    def list(self) -> list[SandboxRecord]:
        return list(self._records.values())

    async def destroy(self, id_: str) -> None:
        record = self._records.pop(id_, None)
        if record is None:
            raise NotFound(f"no sandbox {id_!r}")
        record.state = "destroyed"
        self._deadlines.cancel(id_)
        if record.runtime.quarantine is not None:
            audit.record(self.state_dir, "sandbox.destroy", sandbox=id_, quarantined=True)
        with contextlib.suppress(Exception):
            await record.runtime.destroy()
