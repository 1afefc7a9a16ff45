"""The daemon's sandbox table: creates, finds, and destroys runtime sandboxes, and cleans up after crashes.

A daemon owns its state directory exclusively (an flock), so two daemons never reap each other's VMs;
on start it reaps whatever a previous owner of the directory left behind.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tartarus import audit, private
from tartarus.daemon.ports import ExposedPorts, Exposure, Rules, load_exposed
from tartarus.errors import Conflict, InvalidArgument, NotFound, PolicyDenied, Quarantined
from tartarus.hibernation import ops
from tartarus.hibernation.image import META, Image, list_images, remove_image, unpin_unused
from tartarus.limits.spec import checkpoint_ttl
from tartarus.limits.ttl import Deadlines
from tartarus.network.policy import NetworkPolicy
from tartarus.network.sandbox import reap_orphans
from tartarus.policy import Policy, PolicyEngine, load_policy
from tartarus.policy.admission import Admission, admit, contain, create_request
from tartarus.private import make_private
from tartarus.quarantine import actions as quarantine_actions
from tartarus.quarantine.triggers import RefusedPacketsTrigger
from tartarus.runtime import descriptor
from tartarus.runtime.sandbox import RuntimeSandbox, SandboxOptions, reap_leftovers, reap_workdir
from tartarus.runtime.vm import is_our_vmm
from tartarus.snapshots.pool import VMMPool
from tartarus.snapshots.restore import compatible, restore
from tartarus.snapshots.store import Snapshot, find_snapshot
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


# Disk for hibernated sandboxes and checkpoints together when TARTARUS_HIBERNATE_QUOTA_MIB is not set:
# about 20 captures of a 1 GiB guest. On by default, so that captures cannot fill the state disk.
DEFAULT_HIBERNATE_QUOTA_MIB = 20 * 1024


def _quota_from_env() -> int | None:
    raw = os.environ.get("TARTARUS_HIBERNATE_QUOTA_MIB")
    if not raw:
        return DEFAULT_HIBERNATE_QUOTA_MIB * 2**20
    if raw == "unlimited":
        return None
    try:
        mib = int(raw)
    except ValueError:
        mib = -1
    if mib < 0:
        raise InvalidArgument(
            f"TARTARUS_HIBERNATE_QUOTA_MIB must be a number of MiB or 'unlimited', not {raw!r}"
        )
    return mib * 2**20


IDLE_CHECK_S = 1.0
CHECKPOINT_SWEEP_S = 60.0  # how often expired checkpoints are deleted (their TTLs are hours to days)


def _policy_from_env() -> Policy:
    path = os.environ.get("TARTARUS_POLICY")
    return load_policy(Path(path)) if path else Policy()


@dataclass(frozen=True)
class DaemonConfig:
    # Pre-started VMMs kept per template snapshot; 0 disables the pool (creates only get slower).
    pool_size: int = field(default_factory=_pool_size_from_env)
    # Disk that hibernated sandboxes and checkpoints may use together; None: no limit but the disk's.
    # TARTARUS_HIBERNATE_QUOTA_MIB=N|unlimited; unset: DEFAULT_HIBERNATE_QUOTA_MIB.
    hibernate_quota_bytes: int | None = field(default_factory=_quota_from_env)
    # Admission rules, limit caps, quarantine settings (TARTARUS_POLICY=FILE; default: admit all).
    policy: Policy = field(default_factory=_policy_from_env)
    # VMMs outlive the daemon, and a restarted daemon takes over the sandboxes it finds running
    # (`tartarus serve`). Off for embedded runs, whose VMMs die with them (parent-death signal).
    live_restore: bool = False
    # With live_restore: a clean stop leaves running sandboxes running too (restarts, upgrades).
    keep_on_stop: bool = False
    # The converted-image cache the images API uses; None: `<cache>/images`, shared with the CLI.
    image_root: Path | None = None


@dataclass
class SandboxRecord:
    id: str
    template: Template
    runtime: RuntimeSandbox | None  # None while hibernated
    state: str  # "running" | "hibernated" | "failed"
    snapshot: Snapshot | None = None  # the snapshot it was restored from: what hibernation needs
    image: Image | None = None  # while hibernated
    error: str | None = None
    idle_timeout: float | None = None  # hibernate after this many idle seconds
    created_at: float = field(default_factory=time.time)
    last_active: float = field(default_factory=time.monotonic)
    busy: int = 0
    connections: int = 0  # open through exposed ports: keep it from idling, not from an explicit hibernate
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tenant: str = "default"
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def timings(self) -> dict[str, float]:
        return self.runtime.timings if self.runtime else {}


class SandboxManager:
    def __init__(self, state_dir: Path, config: DaemonConfig | None = None) -> None:
        self.state_dir = state_dir
        self.config = config or DaemonConfig()
        self._pools: dict[str, VMMPool] = {}
        self.layout = ops.Layout(state_dir)
        self.sandboxes_dir = self.layout.sandboxes
        self._records: dict[str, SandboxRecord] = {}
        self._lock_file: IO[str] | None = None
        self._adoptable: dict[Path, dict[str, Any]] = {}
        self._idle_task: asyncio.Task[None] | None = None
        self.policy = PolicyEngine(self.config.policy)
        self._deadlines = Deadlines()
        self._ttl_s: dict[str, float] = {}  # the timeout each deadline was set with, for the record
        self._ended: dict[str, str] = {}  # why recently ended sandboxes ended (TTL), for a clear 404
        self._trigger_task: asyncio.Task[None] | None = None
        # Told (id, why) after a sandbox's timeout destroyed it (the control plane stores the end).
        self.on_expired: Callable[[str, str], Awaitable[None]] | None = None
        # Told (operation, seconds) of each wake, hibernation and admission decision (metrics).
        self.observe: Callable[[str, float], None] = lambda operation, seconds: None
        # Held around each wake: the control plane admits it against the owner's quota (QuotaExceeded).
        self.admit_wake: Callable[[SandboxRecord], contextlib.AbstractAsyncContextManager[object]] = (
            lambda record: contextlib.nullcontext()
        )
        self._sweep_task: asyncio.Task[None] | None = None
        self.ports = ExposedPorts(self._into, _port_rules(self.policy.policy))

    def open(self) -> list[str]:
        """Take ownership of the state directory and reap leftovers. Returns the ids reaped."""
        make_private(self.state_dir)  # before anything is written in it: tenants' data only we may read
        lock = open(self.state_dir / "daemon.lock", "a+", opener=private.opener)  # noqa: SIM115
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
        # Before the leftovers are reaped: a wake cut short may have left the only copy of a sandbox.
        restored, lost = ops.recover_wakes(self.layout)
        if restored:
            log.warning(
                "put back %d sandboxes whose wake a previous daemon left: %s",
                len(restored),
                ", ".join(restored),
            )
        if lost:
            log.error("lost %d sandboxes that a previous daemon died waking: %s", len(lost), ", ".join(lost))
        hibernated = list_images(self.layout.hibernated, self.layout.seal)
        self._adoptable = self._find_adoptable({image.id for image in hibernated})
        reaped = reap_leftovers(self.sandboxes_dir, keep=set(self._adoptable))
        if reaped:
            log.warning("reaped %d sandboxes left by a previous daemon: %s", len(reaped), ", ".join(reaped))
        self.sandboxes_dir.mkdir(mode=private.PRIVATE_DIR, exist_ok=True)
        _reap_orphan_namespaces()
        for staging in self.layout.checkpoints.glob(".*.staging"):
            shutil.rmtree(staging, ignore_errors=True)
        for image in hibernated:
            self._records[image.id] = SandboxRecord(
                image.id,
                image.template,
                None,
                "hibernated",
                image=image,
                created_at=image.created_at,
                idle_timeout=image.request.get("idle_timeout"),
                tenant=image.request.get("tenant", "default"),
                labels=dict(image.request.get("labels") or {}),
            )
        return reaped

    def _find_adoptable(self, hibernated: set[str]) -> dict[Path, dict[str, Any]]:
        """Working directories of sandboxes whose VMM outlived the previous daemon, by descriptor.
        One that hibernated (committed) meanwhile is not: its image is the sandbox now."""
        found: dict[Path, dict[str, Any]] = {}
        if not self.config.live_restore or not self.sandboxes_dir.exists():
            return found
        for workdir in self.sandboxes_dir.iterdir():
            data = descriptor.read(workdir, self.layout.seal) if workdir.is_dir() else None
            if data is not None and _still_running(data, workdir, hibernated):
                ops.undo_staging(workdir)  # it died mid-hibernation, before the commit point
                found[workdir] = data
        return found

    async def adopt_running(self) -> list[str]:
        """Take over the sandboxes `open` found running (call from the event loop, before serving).
        One that cannot be reconnected to is reaped. Listens again on the exposed ports of those and
        of the hibernated ones. Returns the ids taken over."""
        adopted: list[str] = []
        adoptable, self._adoptable = self._adoptable, {}
        for workdir, data in adoptable.items():
            rec = data.get("record") or {}
            try:
                template = get_template(str(data["template"]))
                runtime = await descriptor.attach(data, template, workdir)
            except Exception as e:
                log.warning("could not take over sandbox %s (%s): reaping it", data.get("id"), e)
                reap_workdir(workdir)
                continue
            snapshot_path = rec.get("snapshot")
            snapshot = None
            if snapshot_path and (Path(snapshot_path) / "snapshot.json").exists():
                snapshot = Snapshot.load(Path(snapshot_path))
            record = SandboxRecord(
                runtime.id,
                template,
                runtime,
                "running",
                snapshot,
                idle_timeout=rec.get("idle_timeout"),
                created_at=runtime.created_at,
                tenant=str(rec.get("tenant", "default")),
                labels=dict(rec.get("labels") or {}),
            )
            self._records[runtime.id] = record
            self._watch(record)
            await self._listen_again(runtime.id, rec.get("exposed"), record.tenant)
            adopted.append(runtime.id)
        if adopted:
            log.warning("took over %d running sandboxes: %s", len(adopted), ", ".join(adopted))
            audit.record(self.state_dir, "sandbox.adopted", sandboxes=adopted)
        for record in list(self._records.values()):
            if record.image is not None:
                await self._listen_again(record.id, record.image.request.get("exposed"), record.tenant)
        return adopted

    async def _listen_again(self, id_: str, exposed: object, tenant: str) -> None:
        if self.policy.policy.network.expose:
            await self.ports.listen_again(id_, load_exposed(exposed), tenant)

    def save(self, record: SandboxRecord) -> None:
        """Write down a running sandbox for the next daemon (`tartarus.runtime.descriptor`). Failing to
        is not the caller's failure: the sandbox runs on, and a daemon that crashes would reap it."""
        if not self.config.live_restore or record.runtime is None or record.state != "running":
            return
        try:
            self._write_descriptor(record)
        except OSError as e:
            log.warning("could not describe sandbox %s for a restarted daemon: %s", record.id, e)

    def _write_descriptor(self, record: SandboxRecord) -> None:
        assert record.runtime is not None
        descriptor.write(
            record.runtime,
            {
                "tenant": record.tenant,
                "labels": record.labels,
                "idle_timeout": record.idle_timeout,
                "snapshot": str(record.snapshot.path) if record.snapshot else None,
                "exposed": self.ports.written(record.id),
            },
            self.layout.seal,
        )

    def start_pools(self) -> None:
        """Pre-start VMMs for every template that has a snapshot, and watch for idle sandboxes (call
        from the event loop)."""
        for template in list_templates():
            self._pool_for(template)
        self._idle_task = asyncio.create_task(self._hibernate_idle(), name="idle-hibernation")
        self._sweep_task = asyncio.create_task(self._sweep_checkpoints(), name="checkpoint-expiry")
        self._start_triggers()

    def _start_triggers(self) -> None:
        """Runtime quarantine triggers (policy `quarantine.refused_packets`)."""
        settings = self.policy.policy.quarantine
        if settings.refused_packets is None or self._trigger_task is not None:
            return
        trigger = RefusedPacketsTrigger(settings.refused_packets, settings.window_s, self.quarantine)
        self._trigger_task = asyncio.create_task(trigger.run(self._live), name="quarantine-triggers")

    def _live(self) -> builtins.list[RuntimeSandbox]:
        return [r.runtime for r in self._records.values() if r.state == "running" and r.runtime]

    def _pool_for(self, template: Template) -> VMMPool | None:
        snapshot = find_snapshot(template) if template.snapshotted else None
        if snapshot is None or self.config.pool_size <= 0:
            return None
        pool = self._pools.get(snapshot.key)
        if pool is None:
            pool = VMMPool(
                snapshot,
                template,
                self.sandboxes_dir,
                self.config.pool_size,
                outlive_owner=self.config.live_restore,
            )
            self._pools[snapshot.key] = pool
        return pool

    @property
    def pooled(self) -> int:
        return sum(len(p) for p in self._pools.values())

    async def close(self) -> None:
        """Stop every running sandbox (or, with `keep_on_stop`, let go of them for the next daemon);
        hibernated ones stay on disk for the next daemon."""
        await self._deadlines.close()
        for task in (self._idle_task, self._trigger_task, self._sweep_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._idle_task = self._trigger_task = self._sweep_task = None
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()
        kept = await self._let_go() if self.config.live_restore and self.config.keep_on_stop else set()
        running = [r.id for r in self._records.values() if r.state != "hibernated" and r.id not in kept]
        await asyncio.gather(*(self.destroy(id_) for id_ in running), return_exceptions=True)
        await self.ports.close_all()  # those of kept and hibernated sandboxes: the next daemon listens
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def _let_go(self) -> set[str]:
        """Leave the running sandboxes running, described for the next daemon; returns their ids (their
        records stay, still `running`, so the store keeps them so)."""
        kept: set[str] = set()
        for record in list(self._records.values()):
            if record.state != "running" or record.runtime is None or record.lock.locked():
                continue  # one mid-operation is destroyed: it cannot be described consistently
            try:
                self._write_descriptor(record)
                await record.runtime.detach()
            except Exception:
                log.exception("could not leave sandbox %s running; destroying it", record.id)
                continue
            kept.add(record.id)
        if kept:
            log.info("left %d sandboxes running for the next daemon", len(kept))
        return kept

    async def create(
        self,
        template_name: str,
        options: SandboxOptions,
        idle_timeout: float | None = None,
        *,
        tenant: str = "default",
        labels: Mapping[str, str] | None = None,
    ) -> SandboxRecord:
        template = get_template(template_name)
        admission = await self._admit(template, options, tenant, labels)
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
            snapshot = None
            runtime = await RuntimeSandbox.boot(template, self.sandboxes_dir, options)
            await self._contain(runtime, admission)
        return self._add(runtime, snapshot, idle_timeout, admission, tenant, labels)

    async def _admit(
        self, template: Template, options: SandboxOptions, tenant: str, labels: Mapping[str, str] | None
    ) -> Admission:
        """The policy's verdict and the sandbox's limits (set on `options`), before any VMM is touched."""
        t0 = time.perf_counter()
        try:
            admission = await admit(self.policy, create_request(template, options, tenant, labels))
        except PolicyDenied as e:
            audit.record(
                self.state_dir, "sandbox.rejected", tenant=tenant, template=template.name, reason=e.message
            )
            raise
        finally:
            self.observe("admission", time.perf_counter() - t0)
        options.limits = admission.limits
        options.outlive_owner = self.config.live_restore
        return admission

    async def _contain(self, runtime: RuntimeSandbox, admission: Admission) -> None:
        """Network policy, quarantine verdict, guest limits; a sandbox that cannot be contained is
        destroyed, never handed out."""
        try:
            await contain(runtime, admission, self.policy.policy.quarantine, self.state_dir)
        except BaseException:
            await runtime.destroy()
            raise

    def _add(
        self,
        runtime: RuntimeSandbox,
        snapshot: Snapshot | None,
        idle_timeout: float | None,
        admission: Admission,
        tenant: str,
        labels: Mapping[str, str] | None,
    ) -> SandboxRecord:
        record = SandboxRecord(
            runtime.id,
            runtime.template,
            runtime,
            "running",
            snapshot,
            idle_timeout=idle_timeout,
            tenant=tenant,
            labels=dict(labels or {}),
        )
        self._records[runtime.id] = record
        self._watch(record)
        self.save(record)
        if admission.limits.ttl_s is not None:
            self.set_ttl(runtime.id, admission.limits.ttl_s)
        return record

    def _watch(self, record: SandboxRecord) -> None:
        assert record.runtime is not None and record.runtime.vm is not None
        record.runtime.vm.on_exit = lambda vm: self._vm_exited(record)

    def _vm_exited(self, record: SandboxRecord) -> None:
        if record.id in self._records and record.state == "running" and not record.lock.locked():
            record.state = "failed"
            vm = record.runtime.vm if record.runtime else None
            record.error = vm.exit_message if vm else "VM exited"
            log.warning("sandbox %s failed: %s", record.id, record.error)

    def get(self, id_: str) -> SandboxRecord:
        record = self._records.get(id_)
        if record is None:
            ended = self._ended.get(id_)
            raise NotFound(f"sandbox {id_!r} {ended}" if ended else f"no sandbox {id_!r}")
        return record

    def why_ended(self, id_: str) -> str | None:
        """Why a recently ended sandbox ended, if the daemon ended it (its timeout)."""
        return self._ended.get(id_)

    def set_ttl(self, id_: str, seconds: float | None) -> None:
        """Destroy the sandbox `seconds` from now (None: never), replacing its TTL."""
        self.get(id_)
        if seconds is None:
            self._deadlines.cancel(id_)
            self._ttl_s.pop(id_, None)
        else:
            self._deadlines.schedule(id_, seconds, lambda: self._expire(id_))
            self._ttl_s[id_] = seconds

    async def _expire(self, id_: str) -> None:
        record = self._records.get(id_)
        if record is None:
            return
        ttl = self._ttl_s.pop(id_, None)
        why = (
            f"was destroyed: its timeout of {ttl:g} s expired"
            if ttl
            else "was destroyed: its timeout expired"
        )
        audit.record(self.state_dir, "sandbox.expired", sandbox=id_, ttl_s=ttl)
        log.info("sandbox %s %s", id_, why)
        self._ended[id_] = why
        while len(self._ended) > 1000:
            del self._ended[next(iter(self._ended))]
        with contextlib.suppress(NotFound):
            await self.destroy(id_)
        if self.on_expired is not None:
            await self.on_expired(id_, why)

    async def quarantine(self, id_: str, reason: str, by: str) -> SandboxRecord:
        """Live quarantine (operator or runtime trigger): network cut now, resources clamped. A
        hibernated sandbox is woken for it, so that it is confined before it can run again."""
        async with self.use(id_) as runtime:
            settings = self.policy.policy.quarantine
            await quarantine_actions.confine(runtime, settings, self.state_dir, reason=reason, by=by)
            self.save(self.get(id_))
        return self.get(id_)

    async def expose(self, id_: str, port: int, protect: bool = False) -> Exposure:
        """A host address that forwards to `port` of the guest (refused while quarantined), protected by
        the sandbox's traffic token if asked or if the policy requires it."""
        if not self.policy.policy.network.expose:
            raise PolicyDenied("exposing guest ports is disabled by this host's policy (network.expose)")
        async with self.use(id_) as runtime:
            if runtime.quarantine is not None:
                raise Conflict(f"sandbox {id_} is quarantined: no port can be exposed")
            if runtime.network is None:
                raise Conflict(f"sandbox {id_} has no network namespace")
            record = self.get(id_)
            exposure = await self.ports.listen(id_, port, tenant=record.tenant, protect=protect)
            self.save(record)
            return exposure

    async def unexpose(self, id_: str, port: int) -> None:
        """Stop forwarding `port` (its connections end), freeing its place in the bounds. A hibernated
        sandbox is woken for it, as for `expose`, so that what is written down stays what is served."""
        async with self.use(id_):
            if not await self.ports.unlisten(id_, port):
                raise NotFound(f"port {port} of sandbox {id_} is not exposed")
            self.save(self.get(id_))

    @contextlib.asynccontextmanager
    async def _into(self, id_: str) -> AsyncIterator[Path]:
        """Where a connection to an exposed port goes: the sandbox's namespace, the sandbox woken
        first if it is hibernated and kept from idling into hibernation while the connection lasts."""
        record = self.get(id_)
        runtime = await self._running(record)
        if runtime.quarantine is not None:
            raise Quarantined(f"sandbox {id_} is quarantined")
        if runtime.network is None:
            raise Conflict(f"sandbox {id_} has no network namespace")
        record.connections += 1
        try:
            yield runtime.network.netns_path
        finally:
            record.connections -= 1
            record.last_active = time.monotonic()

    async def release(self, id_: str, by: str) -> SandboxRecord:
        async with self.use(id_) as runtime:
            await quarantine_actions.release(runtime, self.state_dir, by=by)
            self.save(self.get(id_))
        return self.get(id_)

    def list(self) -> list[SandboxRecord]:
        return list(self._records.values())

    async def begin_call(self, id_: str) -> RuntimeSandbox:
        """The running sandbox for a call, woken first if it is hibernated. Until `release`, it is
        not hibernated (streamed calls hold it for as long as their stream lasts)."""
        record = self.get(id_)
        record.busy += 1
        try:
            return await self._running(record)
        except BaseException:
            self.end_call(record)
            raise

    def end_call(self, record_or_id: SandboxRecord | str) -> None:
        record = record_or_id if isinstance(record_or_id, SandboxRecord) else self._records.get(record_or_id)
        if record is not None:
            record.busy -= 1
            record.last_active = time.monotonic()

    @contextlib.asynccontextmanager
    async def use(self, id_: str) -> AsyncIterator[RuntimeSandbox]:
        runtime = await self.begin_call(id_)
        try:
            yield runtime
        finally:
            self.end_call(id_)

    async def _running(self, record: SandboxRecord) -> RuntimeSandbox:
        if record.state == "hibernated" or record.lock.locked():
            await self.wake(record.id)
        if record.runtime is None:
            raise Conflict(f"sandbox {record.id} is {record.state}")
        return record.runtime

    async def hibernate(self, id_: str) -> SandboxRecord:
        record = self.get(id_)
        async with record.lock:
            if record.state == "hibernated":
                return record
            if record.state != "running" or record.runtime is None:
                raise Conflict(f"sandbox {id_} is {record.state}; only a running sandbox hibernates")
            if record.busy:
                raise Conflict(f"sandbox {id_} has calls in progress; hibernate it when they finish")
            _not_quarantined(record.runtime, "hibernated")
            self.ports.cut(id_)  # connections through exposed ports end; the next one wakes it
            t0 = time.perf_counter()
            try:
                image = await ops.hibernate(
                    record.runtime,
                    record.snapshot,
                    self.layout,
                    self.config.hibernate_quota_bytes,
                    # Its idle timeout too, so that a restarted daemon hibernates it again once woken,
                    # and its exposed ports, so that the addresses its clients hold work again.
                    request={
                        **_request(record),
                        "idle_timeout": record.idle_timeout,
                        "exposed": self.ports.written(id_),
                    },
                )
            except BaseException:
                committed = self.layout.hibernated / id_
                if (committed / META).exists():  # failed after its commit point: roll forward
                    image = Image.load(committed, self.layout.seal)
                else:
                    vm = record.runtime.vm
                    if vm is None or not vm.running:
                        record.state, record.error = "failed", vm.exit_message if vm else "VM exited"
                    raise
            record.runtime, record.image, record.state = None, image, "hibernated"
            self.observe("hibernate", time.perf_counter() - t0)
            log.info("hibernated %s (%d bytes on disk)", id_, image.disk_bytes)
            return record

    async def wake(self, id_: str) -> SandboxRecord:
        record = self.get(id_)
        async with record.lock:
            if record.state != "hibernated":
                return record
            assert record.image is not None
            # Admitted again under the policy in force now: its network and limits are re-applied; and
            # under its tenant's quota, held until it runs (then it counts as usage).
            t0 = time.perf_counter()
            async with self.admit_wake(record):
                options, admission = await self._readmit(record.image)
                runtime, snapshot = await self._start_from(record.image, options, wake=True)
                await self._contain(runtime, admission)
                record.runtime, record.snapshot, record.image = runtime, snapshot, None
                record.state = "running"
            record.last_active = time.monotonic()
            self._watch(record)
            self.save(record)
            self.observe("wake", time.perf_counter() - t0)
            return record

    async def _readmit(self, image: Image) -> tuple[SandboxOptions, Admission]:
        """The create request an image was captured with, through admission again."""
        req = image.request
        options = SandboxOptions(
            vcpus=image.vcpus,
            memory_mib=image.memory_mib,
            env=dict(image.env),
            network=NetworkPolicy.model_validate(req.get("network") or {}),
            max_processes=req.get("max_processes"),
            disk_mib=req.get("disk_mib"),
            ttl_s=req.get("ttl_s"),
        )
        admission = await self._admit(
            image.template, options, req.get("tenant", "default"), req.get("labels")
        )
        return options, admission

    async def _hibernate_idle(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_S)  # a periodic scan, not a wait for work
            now = time.monotonic()
            for record in list(self._records.values()):
                timeout = record.idle_timeout
                if (
                    timeout is not None
                    and record.state == "running"
                    and record.busy == 0
                    and record.connections == 0
                    and not record.lock.locked()
                    and now - record.last_active > timeout
                ):
                    try:
                        await self.hibernate(record.id)
                    except Exception as e:  # it keeps running; try again after the next idle period
                        record.last_active = time.monotonic()
                        log.warning("could not hibernate idle sandbox %s: %s", record.id, e)

    async def checkpoint(self, id_: str, ttl: float | None = None) -> Image:
        """Capture a running sandbox; it is deleted `ttl` seconds after its last use (None: the
        policy's default; over the policy's cap: InvalidArgument)."""
        ttl = checkpoint_ttl(ttl, self.policy.policy.limits)
        async with self.use(id_) as runtime:
            record = self.get(id_)
            _not_quarantined(runtime, "checkpointed or forked")
            cid = "ck-" + secrets.token_hex(6)
            return await ops.checkpoint(
                runtime,
                record.snapshot,
                self.layout,
                cid,
                ttl,
                self.config.hibernate_quota_bytes,
                request=_request(record),
            )

    def checkpoints(self) -> builtins.list[Image]:
        return list_images(self.layout.checkpoints, self.layout.seal)

    def get_checkpoint(self, cid: str) -> Image:
        for image in self.checkpoints():
            if image.id == cid:
                return image
        raise NotFound(f"no checkpoint {cid!r}")

    def delete_checkpoint(self, cid: str) -> None:
        remove_image(self.get_checkpoint(cid).path)

    async def create_from_checkpoint(
        self, cid: str, options: SandboxOptions, idle_timeout: float | None = None
    ) -> SandboxRecord:
        image = self.get_checkpoint(cid)
        ops.touch(image)
        return await self._copy(image, options.env, idle_timeout)

    async def _copy(self, image: Image, env: Mapping[str, str], idle_timeout: float | None) -> SandboxRecord:
        """A new sandbox from a checkpoint, admitted and contained like any create, owned by the
        tenant that captured it."""
        options, admission = await self._readmit(image)
        options.env.update(env)
        runtime, snapshot = await self._start_from(image, options, wake=False)
        await self._contain(runtime, admission)
        req = image.request
        return self._add(
            runtime, snapshot, idle_timeout, admission, req.get("tenant", "default"), req.get("labels")
        )

    async def _start_from(
        self, image: Image, options: SandboxOptions, *, wake: bool
    ) -> tuple[RuntimeSandbox, Snapshot]:
        """Start a sandbox from an image, in a pooled VMM of its snapshot when one is waiting."""
        pool = self._pools.get(image.snapshot_key)
        prepared = pool.take() if pool is not None else None
        try:
            return await ops.start_from(image, self.layout, options, wake=wake, prepared=prepared)
        finally:
            if pool is not None:
                pool.refill()

    async def fork(self, id_: str, count: int) -> builtins.list[SandboxRecord]:
        """`count` running copies of a sandbox, through a checkpoint deleted once they run."""
        if not 1 <= count <= 16:
            raise InvalidArgument(f"fork count must be from 1 to 16, not {count}")
        image = await self.checkpoint(id_)
        try:
            results = await asyncio.gather(
                *(self._copy(image, {}, None) for _ in range(count)), return_exceptions=True
            )
        finally:
            remove_image(image.path)
        copies = [r for r in results if isinstance(r, SandboxRecord)]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await asyncio.gather(*(self.destroy(r.id) for r in copies), return_exceptions=True)
            raise failures[0]
        return copies

    async def _sweep_checkpoints(self) -> None:
        """Delete checkpoints whose TTL has passed (`gc` does too, on demand)."""
        while True:
            await asyncio.sleep(CHECKPOINT_SWEEP_S)  # a periodic scan, not a wait for work
            try:  # on the loop: a restore from a checkpoint touches it (its last use) on the loop too
                removed = self._delete_expired_checkpoints()
            except Exception:
                log.exception("could not delete expired checkpoints")
                continue
            if removed:
                log.info("deleted %d expired checkpoints: %s", len(removed), ", ".join(removed))

    def _delete_expired_checkpoints(self) -> builtins.list[str]:
        expired = [image for image in self.checkpoints() if ops.expired(image)]
        for image in expired:
            remove_image(image.path)
        return [image.id for image in expired]

    def gc(self) -> dict[str, builtins.list[str]]:
        """Delete expired checkpoints and pins that no hibernated sandbox or checkpoint needs."""
        expired = self._delete_expired_checkpoints()
        used = {image.snapshot_key for image in self.checkpoints()}
        used |= {r.image.snapshot_key for r in self._records.values() if r.image is not None}
        used |= {r.snapshot.key for r in self._records.values() if r.snapshot is not None}
        return {
            "checkpoints": expired,
            "pins": unpin_unused(self.layout.pins, used),
            "namespaces": _reap_orphan_namespaces(),
        }

    async def destroy(self, id_: str) -> None:
        record = self._records.pop(id_, None)
        if record is None:
            raise NotFound(f"no sandbox {id_!r}")
        self._deadlines.cancel(id_)
        self._ttl_s.pop(id_, None)
        await self.ports.close(id_)
        async with record.lock:
            record.state = "destroyed"
            if record.image is not None:
                remove_image(record.image.path)
            if record.runtime is not None:
                if record.runtime.quarantine is not None:
                    audit.record(self.state_dir, "sandbox.destroy", sandbox=id_, quarantined=True)
                with contextlib.suppress(Exception):
                    await record.runtime.destroy()


def _still_running(data: dict[str, Any], workdir: Path, hibernated: set[str]) -> bool:
    """The described sandbox's VMM runs, and its hibernation (if any) did not commit. A damaged
    descriptor counts as none: the directory is reaped."""
    try:
        return data["id"] not in hibernated and is_our_vmm(descriptor.vmm_pid(data), workdir)
    except (KeyError, TypeError, ValueError):
        return False


def _reap_orphan_namespaces() -> builtins.list[str]:
    """Host-wide: what crashed daemons or removed state dirs left (`network.sandbox.reap_orphans`)."""
    try:
        return reap_orphans()
    except Exception as e:  # never a reason not to start: no root (no networking at all), a busy netns
        log.warning("could not look for orphaned sandbox namespaces: %s", e)
        return []


def _not_quarantined(runtime: RuntimeSandbox, what: str) -> None:
    """A quarantined sandbox stays where its operator can see it until released."""
    if runtime.quarantine is not None:
        raise Quarantined(f"sandbox {runtime.id} is quarantined and cannot be {what} until it is released")


def _port_rules(policy: Policy) -> Rules:
    n = policy.network
    return Rules(
        require_token=n.expose_requires_token,
        ports_per_sandbox=n.max_exposed_ports_per_sandbox,
        ports_per_tenant=n.max_exposed_ports_per_tenant,
        connections_per_sandbox=n.max_exposed_connections_per_sandbox,
        connections_per_tenant=n.max_exposed_connections_per_tenant,
    )


def _request(record: SandboxRecord) -> dict[str, Any]:
    """What a capture must remember to admit the sandbox (or its copies) again: owner and request."""
    assert record.runtime is not None
    options = record.runtime.options
    return {
        "tenant": record.tenant,
        "labels": record.labels,
        "network": options.network.model_dump(mode="json"),
        "max_processes": options.max_processes,
        "disk_mib": options.disk_mib,
        "ttl_s": options.ttl_s,
    }
