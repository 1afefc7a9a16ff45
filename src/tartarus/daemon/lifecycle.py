"""Where sandboxes start and stop: the one start path (admit → start → contain) that create, wake and
the copies of a checkpoint (fork, create-from-checkpoint) all take, and hibernation, checkpoints and
destruction. The table (`daemon.table`) holds the records; this module changes them."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from tartarus import audit
from tartarus.daemon.config import DaemonConfig
from tartarus.daemon.pools import Pools
from tartarus.daemon.ports import ExposedPorts
from tartarus.daemon.table import Change, SandboxRecord, SandboxTable
from tartarus.errors import Conflict, InvalidArgument, NotFound, PolicyDenied, Quarantined
from tartarus.limits.spec import checkpoint_ttl
from tartarus.policy import PolicyEngine
from tartarus.policy.admission import admit
from tartarus.policy.model import QuarantineSettings
from tartarus.sandbox import capture
from tartarus.sandbox.backend import Backend
from tartarus.sandbox.choice import choose, refuse_on_gvisor, vm_backend
from tartarus.sandbox.layout import Layout
from tartarus.sandbox.quarantine import Confinement
from tartarus.sandbox.sandbox import Sandbox, compatible
from tartarus.sandbox.saved import META, SavedSandbox, list_saved, remove_saved
from tartarus.sandbox.spec import Admission, SandboxSpec
from tartarus.snapshots.ready import WarmPool
from tartarus.snapshots.snapshot import Snapshot, find_snapshot
from tartarus.templates.built import Template, get_template

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FromTemplate:
    """A new sandbox of the spec's template: restored from its snapshot (in a pooled VMM when one is
    waiting) when the spec's shape allows, else cold-booted."""


@dataclass(frozen=True)
class FromCapture:
    """The hibernated sandbox `saved` woken (`wake`), or a new sandbox copied from the checkpoint."""

    saved: SavedSandbox
    wake: bool


Source = FromTemplate | FromCapture
TEMPLATE = FromTemplate()


@dataclass(frozen=True)
class Started:
    runtime: Sandbox
    snapshot: Snapshot | None  # the snapshot under it (None: cold-booted), which a capture needs
    admission: Admission


class Lifecycle:
    def __init__(
        self,
        state_dir: Path,
        config: DaemonConfig,
        policy: PolicyEngine,
        table: SandboxTable,
        pools: Pools,
        ports: ExposedPorts,
    ) -> None:
        self.state_dir = state_dir
        self.layout = Layout(state_dir)
        self.config = config
        self.policy = policy
        self.table = table
        self.pools = pools
        self.ports = ports
        # Told (operation, seconds) of each wake, hibernation and admission decision (metrics).
        self.observe: Callable[[str, float], None] = lambda operation, seconds: None
        # Held around each wake: the control plane admits it against the owner's quota (QuotaExceeded).
        self.admit_wake: Callable[[SandboxRecord], contextlib.AbstractAsyncContextManager[object]] = (
            lambda record: contextlib.nullcontext()
        )
        # Write a running sandbox down for a restarted daemon (`daemon.recovery`).
        self.save: Callable[[SandboxRecord], None] = lambda record: None
        # Its lifetime (`daemon.schedulers`): set at start, forgotten at its end.
        self.set_ttl: Callable[[str, float], None] = lambda id_, seconds: None
        self.forget_ttl: Callable[[str], None] = lambda id_: None

    # ---- the start path -------------------------------------------------------------------------

    async def start(self, spec: SandboxSpec, source: Source = TEMPLATE) -> Started:
        """The one way a sandbox starts: admitted under the policy in force now, started from its
        source, contained as admitted. A sandbox that cannot be contained is destroyed, never handed
        out. The caller adds it to the table (or, for a wake, puts it back in its record)."""
        with self.pools.starts.starting():  # the ready pools refill when no start is in progress
            return await self._start(spec, source)

    async def _start(self, spec: SandboxSpec, source: Source) -> Started:
        if isinstance(source, FromCapture):
            saved = source.saved
            # The capture's shape, not the template's: it was restored, so the two agree.
            asked = dataclasses.replace(spec, vcpus=saved.vcpus, memory_mib=saved.memory_mib)
            backend = "gvisor" if saved.bundle is not None else vm_backend()
            admission = await self.admit(saved.template, asked, backend)
            start = Sandbox.wake if source.wake else Sandbox.copy
            pool = self.pools.for_image(saved) if saved.bundle is None else None
            with self.pools.take(pool) as prepared:
                runtime, snapshot = await start(
                    saved,
                    self.layout,
                    spec,
                    limits=admission.limits,
                    outlive_owner=self.config.live_restore,
                    prepared=prepared,
                )
                await self._contain(runtime, admission)
            return Started(runtime, snapshot, admission)
        template = get_template(spec.template)
        backend = choose(spec.backend, template, self.config.backend)
        admission = await self.admit(template, spec, backend)
        if backend == "gvisor":
            refuse_on_gvisor(template, spec, admission)
            bound = await self._from_ready(self.pools.ready_for_gvisor(template), spec, admission)
            if bound is not None:
                return Started(bound, None, admission)
            with self.pools.take(self.pools.for_gvisor(template)) as prepared:
                runtime = await Sandbox.start_gvisor(
                    template, self.layout.sandboxes, spec, limits=admission.limits, prepared=prepared,
                    outlive_owner=self.config.live_restore,
                )  # fmt: skip
                await self._contain(runtime, admission)  # before the refill competes for the CPU
            return Started(runtime, None, admission)
        found = find_snapshot(template) if template.snapshotted else None
        if found is not None and compatible(found, spec):
            bound = await self._from_ready(self.pools.ready_for(template), spec, admission)
            if bound is not None:
                return Started(bound, found, admission)
            with self.pools.take(self.pools.for_template(template)) as prepared:
                runtime = await Sandbox.restore(
                    found,
                    template,
                    self.layout.sandboxes,
                    spec,
                    prepared,
                    limits=admission.limits,
                    outlive_owner=self.config.live_restore,
                )
                await self._contain(runtime, admission)  # before the refill competes for the CPU
            return Started(runtime, found, admission)
        if (ready := self.pools.ready_for(template)) is not None:
            ready.decline()  # another shape than the snapshot's: cold-booted
        runtime = await Sandbox.boot(
            template,
            self.layout.sandboxes,
            spec,
            limits=admission.limits,
            outlive_owner=self.config.live_restore,
        )
        await self._contain(runtime, admission)
        return Started(runtime, None, admission)

    async def _from_ready(
        self, pool: WarmPool | None, spec: SandboxSpec, admission: Admission
    ) -> Sandbox | None:
        """A ready sandbox of the template (from its VM or gVisor ready `pool`) bound to this request and
        contained, or None (the caller restores). A quarantined create never takes one: it is restored
        behind a gate closed before its guest runs (a ready one has been running, on the `none` policy,
        since before)."""
        if pool is None:
            return None
        if admission.decision.quarantined:
            pool.decline()
            return None
        try:
            sandbox = pool.take()
            if sandbox is not None:
                await sandbox.bind(spec, admission.limits)
                await self._contain(sandbox, admission)
            return sandbox
        finally:
            pool.refill()  # of what was taken or found dead; held by the request until it has answered

    async def admit(self, template: Template, spec: SandboxSpec, backend: Backend | None = None) -> Admission:
        """The policy's verdict and the sandbox's limits, before any VMM is touched."""
        t0 = time.perf_counter()
        try:
            return await admit(self.policy, template, spec, backend)
        except PolicyDenied as e:
            audit.record(
                self.state_dir,
                "sandbox.rejected",
                tenant=spec.tenant,
                template=template.name,
                reason=e.message,
            )
            raise
        finally:
            self.observe("admission", time.perf_counter() - t0)

    async def _contain(self, runtime: Sandbox, admission: Admission) -> None:
        try:
            await runtime.contain(admission, confinement(self.policy.policy.quarantine), self.state_dir)
        except BaseException:
            await runtime.destroy()
            raise

    def _add(self, spec: SandboxSpec, started: Started) -> SandboxRecord:
        runtime = started.runtime
        record = SandboxRecord(runtime.id, runtime.template, spec, runtime, "running", started.snapshot)
        record.set_timeout(started.admission.limits.ttl_s)
        self.table.add(record)
        self.save(record)
        if started.admission.limits.ttl_s is not None:
            self.set_ttl(runtime.id, started.admission.limits.ttl_s)
        return record

    # ---- the verbs that start one ---------------------------------------------------------------

    async def create(self, spec: SandboxSpec) -> SandboxRecord:
        return self._add(spec, await self.start(spec))

    async def wake(self, id_: str) -> SandboxRecord:
        record = self.table.get(id_)
        async with record.lock:
            if record.state != "hibernated":
                return record
            saved = record.saved
            assert saved is not None
            # Admitted again under the policy in force now: its network and limits are re-applied; and
            # under its tenant's quota, held until it runs (then it counts as usage).
            t0 = time.perf_counter()
            async with self.admit_wake(record):
                started = await self.start(saved.spec, FromCapture(saved, wake=True))
                record.runtime, record.snapshot, record.saved = started.runtime, started.snapshot, None
                record.state = "running"
            record.last_active = time.monotonic()
            self.table.woken(record)
            self.save(record)
            self.observe("wake", time.perf_counter() - t0)
            return record

    async def copy(self, saved: SavedSandbox, spec: SandboxSpec) -> SandboxRecord:
        """A new sandbox from a checkpoint, admitted and contained like any create."""
        return self._add(spec, await self.start(spec, FromCapture(saved, wake=False)))

    async def fork(self, id_: str, count: int, tenant: str) -> builtins.list[SandboxRecord]:
        """`count` running copies of a sandbox, owned by `tenant`, through a checkpoint deleted once
        they run."""
        if not 1 <= count <= 16:
            raise InvalidArgument(f"fork count must be from 1 to 16, not {count}")
        saved = await self.checkpoint(id_)
        spec = dataclasses.replace(saved.spec, tenant=tenant, idle_timeout=None)
        try:
            results = await asyncio.gather(
                *(self.copy(saved, spec) for _ in range(count)), return_exceptions=True
            )
        finally:
            remove_saved(saved.path)
        copies = [r for r in results if isinstance(r, SandboxRecord)]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await asyncio.gather(*(self.destroy(r.id) for r in copies), return_exceptions=True)
            raise failures[0]
        return copies

    # ---- calls ----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, id_: str) -> AsyncIterator[Sandbox]:
        """The running sandbox for a call, woken first if it is hibernated. Until the block ends, it
        is not hibernated (streamed calls hold it for as long as their stream lasts)."""
        record = self.table.get(id_)
        record.busy += 1
        try:
            yield await self.running(record)
        finally:
            record.busy -= 1
            record.last_active = time.monotonic()

    async def running(self, record: SandboxRecord) -> Sandbox:
        """Its runtime, woken first if it is hibernated (or being hibernated or woken now)."""
        if record.state == "hibernated" or record.lock.locked():
            await self.wake(record.id)
        if record.runtime is None:
            raise Conflict(f"sandbox {record.id} is {record.state}")
        return record.runtime

    # ---- capturing ------------------------------------------------------------------------------

    async def hibernate(self, id_: str) -> SandboxRecord:
        record = self.table.get(id_)
        async with record.lock:
            if record.state == "hibernated":
                return record
            if record.state != "running" or record.runtime is None:
                raise Conflict(f"sandbox {id_} is {record.state}; only a running sandbox hibernates")
            if record.busy:
                raise Conflict(f"sandbox {id_} has calls in progress; hibernate it when they finish")
            not_quarantined(record.runtime, "hibernated")
            self.ports.cut(id_)  # connections through exposed ports end; the next one wakes it
            t0 = time.perf_counter()
            try:
                # With its exposed ports, so that the addresses its clients hold work again once woken.
                saved = await record.runtime.hibernate(
                    record.snapshot,
                    self.layout,
                    self.config.hibernate_quota_bytes,
                    exposed=self.ports.written(id_),
                )
            except BaseException:
                committed = self.layout.hibernated / id_
                if (committed / META).exists():  # failed after its commit point: roll forward
                    saved = SavedSandbox.load(committed, self.layout.seal)
                else:
                    engine = record.runtime.engine
                    if engine is None or not engine.running:
                        self.table.failed(record)
                    raise
            record.runtime, record.saved, record.state = None, saved, "hibernated"
            self.table.changed(record, "hibernated")
            self.observe("hibernate", time.perf_counter() - t0)
            log.info("hibernated %s (%d bytes on disk)", id_, saved.disk_bytes)
            self.pools.for_image(saved)  # its wake's spares (lazy ones are made on first use) fill now
            return record

    async def checkpoint(self, id_: str, ttl: float | None = None) -> SavedSandbox:
        """Capture a running sandbox; it is deleted `ttl` seconds after its last use (None: the
        policy's default; over the policy's cap: InvalidArgument)."""
        ttl = checkpoint_ttl(ttl, self.policy.policy.limits)
        async with self.use(id_) as runtime:
            record = self.table.get(id_)
            not_quarantined(runtime, "checkpointed or forked")
            cid = "ck-" + secrets.token_hex(6)
            return await runtime.checkpoint(
                record.snapshot, self.layout, cid, ttl, self.config.hibernate_quota_bytes
            )

    def checkpoints(self) -> builtins.list[SavedSandbox]:
        return list_saved(self.layout.checkpoints, self.layout.seal)

    def get_checkpoint(self, cid: str) -> SavedSandbox:
        for saved in self.checkpoints():
            if saved.id == cid:
                return saved
        raise NotFound(f"no checkpoint {cid!r}")

    def delete_expired_checkpoints(self) -> builtins.list[str]:
        expired = [saved for saved in self.checkpoints() if capture.expired(saved)]
        for saved in expired:
            remove_saved(saved.path)
        return [saved.id for saved in expired]

    # ---- the end --------------------------------------------------------------------------------

    async def destroy(self, id_: str, why: str | None = None, change: Change = "destroyed") -> None:
        """Destroy a sandbox; `why` (and `change`, "expired") when the daemon ends it itself."""
        record = self.table.remove(id_)
        self.forget_ttl(id_)
        await self.ports.close(id_)
        async with record.lock:
            self.table.ended(record, why, change)
            if record.saved is not None:
                remove_saved(record.saved.path)
            if record.runtime is not None:
                if record.runtime.quarantined is not None:
                    audit.record(self.state_dir, "sandbox.destroy", sandbox=id_, quarantined=True)
                with contextlib.suppress(Exception):
                    await record.runtime.destroy()


def confinement(settings: QuarantineSettings) -> Confinement:
    """The policy's quarantine settings, as the sandbox takes them."""
    return Confinement(settings.cpu_fraction, settings.memory_mib, settings.bandwidth)


def not_quarantined(runtime: Sandbox, what: str) -> None:
    """A quarantined sandbox stays where its operator can see it until released."""
    if runtime.quarantined is not None:
        raise Quarantined(f"sandbox {runtime.id} is quarantined and cannot be {what} until it is released")
