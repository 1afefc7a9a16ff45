"""`tartarus agent`: the daemon's sandbox half on one host, serving only gateways, while its lease holds.

The agent is the daemon's own app (the same routes, sandboxes, quotas and records as `serve`) with two
changes: callers are who the gateway says (`caller`), and a guard in front admits a request only with the
shared agent token and only while the node's lease certainly holds (`LeaseKeeper.holds`), so a partitioned
or fenced agent takes no work even before it can hear that it was fenced. It registers in the cluster
schema on start (reconciling what it runs), releases a sandbox's placement when the sandbox ends, and on
a fence kills what the cluster gave up on and registers again under a new epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tartarus.cluster.db import Connection, connect
from tartarus.cluster.errors import ClusterUnavailable, Fenced
from tartarus.cluster.lease import LeaseKeeper
from tartarus.cluster.membership import DEFAULT_LEASE_S
from tartarus.cluster.model import NodeSpec, PlacementState, Resources
from tartarus.cluster.objects import ObjectStore, S3Config
from tartarus.cluster.placement import Placer
from tartarus.cluster.schema import migrate
from tartarus.daemon.app import create_app
from tartarus.daemon.asgi import error_response, header
from tartarus.daemon.auth import Principal
from tartarus.daemon.config import DaemonConfig
from tartarus.daemon.control import PUBLIC_ROUTES, ControlPlane
from tartarus.daemon.manager import SandboxManager
from tartarus.daemon.server import GRACE_S
from tartarus.daemon.table import Change, SandboxRecord
from tartarus.errors import AuthError, NotFound, TartarusError
from tartarus.roles import caller
from tartarus.roles.cluster_routes import PREFIX as CLUSTER_PREFIX
from tartarus.roles.cluster_routes import cluster_app
from tartarus.roles.metrics import LeaseMetrics, TransferMetrics
from tartarus.roles.stored import StateSync, forget
from tartarus.roles.token import AgentToken
from tartarus.snapshots.snapshot import find_snapshot
from tartarus.store import Tenant
from tartarus.templates.built import list_templates

log = logging.getLogger(__name__)

DEFAULT_SLOTS = 64
ENDED: frozenset[Change] = frozenset({"destroyed", "expired"})
METRICS = "/metrics"


class NodeNotServing(TartarusError):
    """The agent's lease may have lapsed: it takes no work until it has registered again (503, so a
    gateway tries another node)."""

    code = "node_fenced"
    status = 503


class AgentControl(ControlPlane):
    """The daemon's control plane, with callers named by the gateway (the guard checked the token)."""

    async def authenticate(self, authorization: str | None) -> tuple[Principal, Tenant | None]:
        scheme, _, value = (authorization or "").partition(" ")
        if scheme != caller.SCHEME:
            raise AuthError("this is a cluster agent: it serves only its gateways")
        principal = caller.decode(value)
        return principal, await self.db(self.store.get_tenant, principal.tenant)


def host_capacity(state_dir: Path, slots: int = DEFAULT_SLOTS) -> Resources:
    """What this host offers by default: all its CPUs and memory, the free disk under the state dir."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    state_dir.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(state_dir).free >> 20
    return Resources(os.cpu_count() or 1, memory, disk, slots)


def held_templates() -> frozenset[str]:
    """The templates this host can restore from a local snapshot (a placement bonus: nothing to fetch);
    a template without a snapshot to take counts once built."""
    return frozenset(t.name for t in list_templates() if not t.snapshotted or find_snapshot(t) is not None)


class AgentNode:
    """This host's membership: the lease, the reconciliation on (re)joining, placements ended here, and
    hibernations handed to the object store (`sync`, when one is configured)."""

    def __init__(
        self, url: str, spec: NodeSpec, *, lease_s: float = DEFAULT_LEASE_S, sync: StateSync | None = None
    ) -> None:
        self.url = url
        self.sync = sync
        self.keeper = LeaseKeeper(url, spec, lease_s=lease_s, on_fenced=self._fenced)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tartarus-cluster")
        self._conn: Connection | None = None
        self._manager: SandboxManager | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rejoining: asyncio.Task[None] | None = None
        self._uploading: asyncio.Future[list[str]] | None = None
        self.fenced = 0  # renewals the database refused (metrics)

    def serving(self) -> bool:
        return self.keeper.holds()

    async def start(self, manager: SandboxManager, control: ControlPlane) -> None:
        """Join the cluster with what the manager runs (after it took over its sandboxes)."""
        self._manager, self._loop = manager, asyncio.get_running_loop()
        await self._loop.run_in_executor(self._executor, self._migrate)
        if self.sync is not None:
            self.sync.attach(manager, control, lambda: self.keeper.lease)
            # Snapshots this node lacks come from the store before it registers, so it announces them.
            got = await self._loop.run_in_executor(None, self.sync.snapshots.fetch_missing)
            spec = self.keeper.spec
            self.keeper.spec = dataclasses.replace(spec, templates=spec.templates | frozenset(got))
        await self._join()
        if self.sync is not None:  # and those it holds the store lacks go up, in the background
            self._uploading = self._loop.run_in_executor(self.sync.pool, self.sync.snapshots.upload_held)
        previous = manager.table.on_change

        def on_change(record: SandboxRecord, change: Change, why: str | None) -> None:
            previous(record, change, why)
            if change in ENDED:
                self._executor.submit(self._ended, record.id)
            elif change == "hibernated" and self.sync is not None:
                self.sync.hibernated(record)

        manager.table.on_change = on_change
        if self.sync is not None:  # hibernated here before a crash or before the store was configured
            for record in manager.list():
                if record.state == "hibernated":
                    self.sync.hibernated(record)

    async def stop(self) -> None:
        if self._rejoining is not None:
            self._rejoining.cancel()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.keeper.stop)
        self._executor.shutdown(wait=True)
        if self.sync is not None:
            await loop.run_in_executor(None, self.sync.close)
        if self._conn is not None:
            self._conn.close()

    def _migrate(self) -> None:
        with connect(self.url) as conn:
            migrate(conn)

    async def _join(self) -> None:
        assert self._manager is not None and self._loop is not None
        manager = self._manager
        running = [r.id for r in manager.list() if r.state != "destroyed"]
        registration = await self._loop.run_in_executor(self._executor, self.keeper.join, running)
        lease = registration.lease
        log.info(
            "joined the cluster as %s (epoch %d): adopted %d, killing %d, lost %d",
            lease.node,
            lease.epoch,
            len(registration.adopted),
            len(registration.kill),
            len(registration.gone),
        )
        for sandbox_id in registration.kill:
            elsewhere = await self._loop.run_in_executor(self._executor, self._lives_elsewhere, sandbox_id)
            record = manager.table.find(sandbox_id)
            if elsewhere and record is not None:
                async with record.lock:  # in the object store or on another node: only our copy goes
                    await forget(manager, record)
                continue
            with contextlib.suppress(NotFound):
                await manager.destroy(sandbox_id, "the cluster gave it up while this node was fenced")

    def _lives_elsewhere(self, sandbox_id: str) -> bool:
        """Whether the cluster still has the sandbox (stored, or placed on another node): then killing our
        copy must not end it (no `ended` placement release, no destroyed record)."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self.url)
            return Placer(self._conn).locate(sandbox_id).state != PlacementState.LOST
        except NotFound:
            return False

    def _fenced(self, e: Fenced) -> None:
        """From the lease thread: stop (the guard already refuses work), reconcile and register again."""
        self.fenced += 1
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._start_rejoin)

    def _start_rejoin(self) -> None:
        if self._rejoining is None or self._rejoining.done():
            self._rejoining = asyncio.get_running_loop().create_task(self._rejoin())

    async def _rejoin(self) -> None:
        while True:
            try:
                await self._join()
                return
            except (ClusterUnavailable, psycopg.Error) as e:
                log.warning("cannot register again yet: %s", e)
                await asyncio.sleep(self.keeper.lease_s / 3)

    def _ended(self, sandbox_id: str) -> None:
        """On the cluster thread: the sandbox's placement (and its capacity) is released."""
        lease = self.keeper.lease
        if lease is None:
            return  # fenced: the next registration reconciles it
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self.url)
            Placer(self._conn).ended(sandbox_id, lease.node, lease.epoch)
        except NotFound:
            pass  # never placed here (a gateway's create that failed before confirming)
        except (ClusterUnavailable, psycopg.Error) as e:
            log.warning("could not release the placement of %s: %s", sandbox_id, e)
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class AgentGuard:
    """In front of the daemon's app: the agent token on every call but health, and a valid lease.
    /metrics also takes an admin API key (checked against the shared store), lease or not, so Prometheus
    scrapes agents as it scrapes `serve` and the gateways, without the agent token."""

    def __init__(
        self, app: ASGIApp, token: AgentToken, node: AgentNode, manager: SandboxManager, control: ControlPlane
    ) -> None:
        self.app = app
        self.token = token
        self.node = node
        self.manager = manager
        self.control = control
        self.cluster = cluster_app(manager, node.sync)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan(send))
            return
        if scope["type"] not in ("http", "websocket") or scope["path"] in PUBLIC_ROUTES:
            await self.app(scope, receive, send)
            return
        authorization = header(scope, b"authorization")
        if scope["type"] == "http" and scope["path"] == METRICS and not self.token.admits(authorization):
            try:
                principal, _ = await ControlPlane.authenticate(self.control, authorization)
            except AuthError as e:
                await error_response(e)(scope, receive, send)
                return
            await self.app(_as_caller(scope, caller.encode(principal)), receive, send)
            return
        if not self.token.admits(authorization):
            refused = AuthError("this is a cluster agent: it serves only gateways presenting the agent token")
            await error_response(refused)(scope, receive, send)
            return
        if not self.node.serving() and scope["path"] != METRICS:
            fenced = NodeNotServing(
                "this node's cluster lease lapsed or is not confirmed: it takes no work until it re-registers"
            )
            await error_response(fenced)(scope, receive, send)
            return
        if scope["type"] == "http" and scope["path"].startswith(CLUSTER_PREFIX):
            await self.cluster(scope, receive, send)
            return
        named = header(scope, caller.CALLER_HEADER.encode()) or ""
        await self.app(_as_caller(scope, named), receive, send)

    def _lifespan(self, send: Send) -> Send:
        async def relay(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                try:
                    await self.node.start(self.manager, self.control)
                except TartarusError as e:
                    await send({"type": "lifespan.startup.failed", "message": e.message})
                    return
            elif message["type"] == "lifespan.shutdown.complete":
                await self.node.stop()
            await send(message)

        return relay


def _as_caller(scope: Scope, named: str) -> Scope:
    """The request as the daemon's app takes it: `Authorization: Gateway <caller>`, nothing else."""
    headers = [
        (k, v)
        for k, v in scope["headers"]
        if k.lower() not in (b"authorization", caller.CALLER_HEADER.encode())
    ]
    headers.append((b"authorization", f"{caller.SCHEME} {named}".encode("latin-1")))
    return {**scope, "headers": headers}


@dataclass(frozen=True)
class AgentOptions:
    host: str
    port: int
    spec: NodeSpec
    database_url: str
    token: AgentToken
    lease_s: float = DEFAULT_LEASE_S
    keep_sandboxes: bool = False
    s3: S3Config | None = None  # where hibernations go so they wake on any node; None: local disk only


def agent_app(state_dir: Path, options: AgentOptions, config: DaemonConfig | None = None) -> AgentGuard:
    app = create_app(state_dir, config, control_type=AgentControl)
    sync = None
    if options.s3 is not None:
        objects = ObjectStore(options.s3)
        objects.ensure_bucket()
        sync = StateSync(objects, options.token, options.database_url)
    node = AgentNode(options.database_url, options.spec, lease_s=options.lease_s, sync=sync)
    control: ControlPlane = app.state.control
    control.metrics.registry.register(LeaseMetrics(node.keeper, lambda: node.fenced))
    # Exported without a store too (no samples), so one dashboard serves every agent.
    moved = None if sync is None else sync.transferred
    control.metrics.registry.register(
        TransferMetrics(
            lambda: {} if moved is None else dict(moved.sent),
            lambda: {} if moved is None else dict(moved.fetched),
        )
    )
    return AgentGuard(app, options.token, node, app.state.manager, control)


def serve_agent(state_dir: Path, options: AgentOptions) -> None:
    """Run the agent until SIGTERM; like `serve`, its sandboxes outlive a crash (the next agent adopts
    those the cluster still places on this node and kills the rest)."""
    config = DaemonConfig(live_restore=True, keep_on_stop=options.keep_sandboxes)
    app = agent_app(state_dir, options, config)
    server_config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        timeout_graceful_shutdown=GRACE_S,
        log_config=None,
        access_log=False,
    )
    uvicorn.Server(server_config).run()
