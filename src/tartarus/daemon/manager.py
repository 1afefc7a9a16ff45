"""The daemon's sandboxes, one facade over the modules that each do one job:

- `table`: the records (one per sandbox) and their lookups; it tells the store of every change;
- `lifecycle`: the one start path (create, wake, copies of a checkpoint) and hibernate, checkpoint, fork,
  destroy;
- `recovery`: the state directory's lock, leftovers of a previous daemon, takeover of running sandboxes;
- `schedulers`: TTLs, idle hibernation, checkpoint expiry, quarantine triggers;
- `pools`: pre-started VMMs and when they refill; `ports`: exposed guest ports.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from tartarus.daemon.config import DaemonConfig
from tartarus.daemon.lifecycle import Lifecycle, confinement
from tartarus.daemon.pools import Pools
from tartarus.daemon.ports import ExposedPorts, Exposure, Rules
from tartarus.daemon.recovery import Recovery, reap_orphan_namespaces
from tartarus.daemon.schedulers import Schedulers
from tartarus.daemon.table import SandboxRecord, SandboxTable
from tartarus.errors import Conflict, NotFound, PolicyDenied, Quarantined
from tartarus.policy import Policy, PolicyEngine
from tartarus.sandbox import capture
from tartarus.sandbox.layout import Layout
from tartarus.sandbox.sandbox import Sandbox
from tartarus.sandbox.saved import SavedSandbox, remove_saved, unpin_unused
from tartarus.sandbox.spec import SandboxSpec

__all__ = ["SandboxManager"]


class SandboxManager:
    def __init__(self, state_dir: Path, config: DaemonConfig | None = None) -> None:
        self.state_dir = state_dir
        self.config = config or DaemonConfig()
        self.layout = Layout(state_dir)
        self.sandboxes_dir = self.layout.sandboxes
        self.policy = PolicyEngine(self.config.policy)
        self.table = SandboxTable()
        self.ports = ExposedPorts(self._into, _port_rules(self.policy.policy))
        self.pools = Pools(
            self.sandboxes_dir,
            self.config.pool_size,
            outlive_owner=self.config.live_restore,
            ready=self.config.ready_pool,
            gvisor=self.config.backend == "gvisor",
        )
        self.lifecycle = Lifecycle(state_dir, self.config, self.policy, self.table, self.pools, self.ports)
        self.recovery = Recovery(state_dir, self.config, self.table, self.ports, self.policy)
        self.schedulers = Schedulers(state_dir, self.table, self.lifecycle)
        self.lifecycle.save = self.recovery.save
        self.lifecycle.set_ttl = self.schedulers.set_ttl
        self.lifecycle.forget_ttl = self.schedulers.forget

    # ---- hooks the control plane sets -----------------------------------------------------------

    @property
    def observe(self) -> Callable[[str, float], None]:
        return self.lifecycle.observe

    @observe.setter
    def observe(self, observe: Callable[[str, float], None]) -> None:
        """Told (operation, seconds) of each wake, hibernation and admission decision (metrics)."""
        self.lifecycle.observe = observe

    @property
    def admit_wake(self) -> Callable[[SandboxRecord], contextlib.AbstractAsyncContextManager[object]]:
        return self.lifecycle.admit_wake

    @admit_wake.setter
    def admit_wake(
        self, admit: Callable[[SandboxRecord], contextlib.AbstractAsyncContextManager[object]]
    ) -> None:
        """Held around each wake: the control plane admits it against the owner's quota."""
        self.lifecycle.admit_wake = admit

    # ---- start and stop -------------------------------------------------------------------------

    def open(self) -> builtins.list[str]:
        """Take ownership of the state directory and reap leftovers. Returns the ids reaped."""
        return self.recovery.open()

    async def adopt_running(self) -> builtins.list[str]:
        return await self.recovery.adopt_running()

    def start_pools(self) -> None:
        """Pre-start VMMs for every template that has a snapshot, and start the schedulers (call from
        the event loop)."""
        self.pools.start()
        self.schedulers.start(self.policy.policy.quarantine, self.quarantine)

    @property
    def pooled(self) -> int:
        return self.pools.ready

    async def close(self) -> None:
        """Stop every running sandbox (or, with `keep_on_stop`, let go of them for the next daemon);
        hibernated ones stay on disk for the next daemon."""
        await self.schedulers.close()
        await self.pools.close()
        keep = self.config.live_restore and self.config.keep_on_stop
        kept = await self.recovery.let_go() if keep else set()
        running = [r.id for r in self.table.list() if r.state != "hibernated" and r.id not in kept]
        await asyncio.gather(
            *(self.destroy(id_, "the daemon shut down") for id_ in running), return_exceptions=True
        )
        await self.ports.close_all()  # those of kept and hibernated sandboxes: the next daemon listens
        self.recovery.close()

    # ---- the table ------------------------------------------------------------------------------

    def get(self, id_: str) -> SandboxRecord:
        return self.table.get(id_)

    def list(self) -> builtins.list[SandboxRecord]:
        return self.table.list()

    def why_ended(self, id_: str) -> str | None:
        return self.table.why_ended(id_)

    def set_ttl(self, id_: str, seconds: float | None) -> None:
        """Destroy the sandbox `seconds` from now (None: never), replacing its TTL."""
        self.schedulers.set_ttl(id_, seconds)
        self.table.get(id_).set_timeout(seconds)

    def save(self, record: SandboxRecord) -> None:
        self.recovery.save(record)

    # ---- lifecycle ------------------------------------------------------------------------------

    async def create(self, spec: SandboxSpec) -> SandboxRecord:
        return await self.lifecycle.create(spec)

    async def wake(self, id_: str) -> SandboxRecord:
        return await self.lifecycle.wake(id_)

    async def hibernate(self, id_: str) -> SandboxRecord:
        return await self.lifecycle.hibernate(id_)

    async def checkpoint(self, id_: str, ttl: float | None = None) -> SavedSandbox:
        return await self.lifecycle.checkpoint(id_, ttl)

    async def fork(self, id_: str, count: int, tenant: str | None = None) -> builtins.list[SandboxRecord]:
        """`count` running copies of a sandbox, owned by `tenant` (default: the sandbox's)."""
        return await self.lifecycle.fork(id_, count, tenant or self.get(id_).tenant)

    async def create_from_checkpoint(
        self,
        cid: str,
        env: dict[str, str] | None = None,
        idle_timeout: float | None = None,
        tenant: str | None = None,
    ) -> SandboxRecord:
        """A new sandbox from a checkpoint, owned by `tenant` (default: the checkpoint's)."""
        saved = self.get_checkpoint(cid)
        capture.touch(saved)
        spec = dataclasses.replace(
            saved.spec,
            env={**saved.spec.env, **(env or {})},
            idle_timeout=idle_timeout,
            tenant=tenant or saved.spec.tenant,
        )
        return await self.lifecycle.copy(saved, spec)

    async def destroy(self, id_: str, why: str | None = None) -> None:
        await self.lifecycle.destroy(id_, why)

    @contextlib.asynccontextmanager
    async def use(self, id_: str) -> AsyncIterator[Sandbox]:
        """The running sandbox for a call, woken first if it is hibernated, and kept from idle
        hibernation until the block ends."""
        async with self.lifecycle.use(id_) as runtime:
            yield runtime

    # ---- checkpoints ----------------------------------------------------------------------------

    def checkpoints(self) -> builtins.list[SavedSandbox]:
        return self.lifecycle.checkpoints()

    def get_checkpoint(self, cid: str) -> SavedSandbox:
        return self.lifecycle.get_checkpoint(cid)

    def delete_checkpoint(self, cid: str) -> None:
        remove_saved(self.get_checkpoint(cid).path)

    def gc(self) -> dict[str, builtins.list[str]]:
        """Delete expired checkpoints and pins that no hibernated sandbox or checkpoint needs."""
        expired = self.lifecycle.delete_expired_checkpoints()
        used = {saved.snapshot_key for saved in self.checkpoints()}
        used |= {r.saved.snapshot_key for r in self.table.list() if r.saved is not None}
        used |= {r.snapshot.key for r in self.table.list() if r.snapshot is not None}
        return {
            "checkpoints": expired,
            "pins": unpin_unused(self.layout.pins, used),
            "namespaces": reap_orphan_namespaces(),
        }

    # ---- quarantine -----------------------------------------------------------------------------

    async def quarantine(self, id_: str, reason: str, by: str) -> SandboxRecord:
        """Live quarantine (operator or runtime trigger): network cut now, resources clamped. A
        hibernated sandbox is woken for it, so that it is confined before it can run again."""
        async with self.use(id_) as runtime:
            settings = confinement(self.policy.policy.quarantine)
            await runtime.quarantine(reason, by, settings, self.state_dir)
            self.save(self.get(id_))
        return self.get(id_)

    async def release(self, id_: str, by: str) -> SandboxRecord:
        async with self.use(id_) as runtime:
            await runtime.release(self.state_dir, by=by)
            self.save(self.get(id_))
        return self.get(id_)

    # ---- exposed ports --------------------------------------------------------------------------

    async def expose(self, id_: str, port: int, protect: bool = False) -> Exposure:
        """A host address that forwards to `port` of the guest (refused while quarantined), protected by
        the sandbox's traffic token if asked or if the policy requires it."""
        if not self.policy.policy.network.expose:
            raise PolicyDenied("exposing guest ports is disabled by this host's policy (network.expose)")
        async with self.use(id_) as runtime:
            if runtime.quarantined is not None:
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
        runtime = await self.lifecycle.running(record)
        if runtime.quarantined is not None:
            raise Quarantined(f"sandbox {id_} is quarantined")
        if runtime.network is None:
            raise Conflict(f"sandbox {id_} has no network namespace")
        record.connections += 1
        try:
            yield runtime.network.netns_path
        finally:
            record.connections -= 1
            record.last_active = time.monotonic()


def _port_rules(policy: Policy) -> Rules:
    n = policy.network
    return Rules(
        require_token=n.expose_requires_token,
        ports_per_sandbox=n.max_exposed_ports_per_sandbox,
        ports_per_tenant=n.max_exposed_ports_per_tenant,
        connections_per_sandbox=n.max_exposed_connections_per_sandbox,
        connections_per_tenant=n.max_exposed_connections_per_tenant,
    )
