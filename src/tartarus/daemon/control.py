"""The control plane around the sandbox manager: who may call, quotas, durable records and the audit trail.

Who owns which sandbox is in the manager's table (`daemon.table`), which tells this layer of every
change as it happens; this layer keeps the store in step. Every database write runs on one worker
thread (the store's connection is single-threaded) and audit-file fsyncs on the audit log's own (a
group commit), so the event loop never waits on a database write or an fsync. Key checks on SQLite
and a new sandbox's row run on the loop itself, over a connection that never waits (`Store.on_loop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials
from starlette.requests import HTTPConnection

from tartarus import audit
from tartarus.daemon import quotas
from tartarus.daemon.auth import Principal, bearer, ensure_local_admin_key, invalid_key, missing_key
from tartarus.daemon.manager import SandboxManager
from tartarus.daemon.metrics import Metrics
from tartarus.daemon.records import StoredSandboxes
from tartarus.daemon.scoped import SandboxTokens, looks_scoped, signed_sandbox
from tartarus.daemon.table import SandboxRecord
from tartarus.daemon.tenancy import TenantQuotas
from tartarus.errors import InvalidArgument, NotFound, QuotaExceeded, TartarusError
from tartarus.private import write_private
from tartarus.sandbox.spec import SandboxSpec
from tartarus.store import ApiKey, DatabaseBusy, SandboxRow, Store, Tenant, open_store
from tartarus.templates.built import get_template

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

PUBLIC_ROUTES = frozenset({"/v1/health"})
# Streaming calls (exec, file reads, terminals) one tenant may have open at once, over all its sandboxes;
# each holds up to a flow-control window of guest output in the daemon (`runtime.flow`).
MAX_TENANT_STREAMS = 128
Start = Callable[[], Awaitable[Sequence[SandboxRecord]]]


def node_id(state_dir: Path) -> str:
    """This daemon's stable name in a shared database: sandboxes it reconciles on restart are its own."""
    path = state_dir / "node-id"
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    node = f"{os.uname().nodename}-{secrets.token_hex(4)}"
    write_private(path, node + "\n")
    return node


def principal_of(request: Request) -> Principal:
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        raise missing_key()
    return principal


def parse_pairs(pairs: Iterable[str], what: str) -> dict[str, str]:
    """`key=value` query parameters (label selectors, environment variables); `what` names them."""
    parsed: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"{what} must be key=value, not {pair!r}")
        parsed[key] = value
    return parsed


def parse_labels(selectors: Iterable[str]) -> dict[str, str]:
    """`key=value` label selectors (all must match)."""
    return parse_pairs(selectors, "label filter")


class ControlPlane:
    def __init__(self, state_dir: Path, manager: SandboxManager) -> None:
        self.state_dir = state_dir
        self.manager = manager
        self.metrics = Metrics(
            states=lambda: (r.state for r in manager.list()),
            pooled=lambda: manager.pooled,
            quarantined=lambda: sum(1 for r in manager.list() if r.runtime and r.runtime.quarantined),
            ready=lambda: manager.pools.ready_stats,
        )
        self.node = ""
        self._store: Store | None = None
        self._on_loop: Store | None = None  # key checks and new rows on the loop (`Store.on_loop`)
        self._audit_log: audit.AuditLog | None = None
        self._audit_rows: set[asyncio.Future[None]] = set()  # queued on the store's thread, in order
        self._executor: ThreadPoolExecutor | None = None
        self._audit_executor: ThreadPoolExecutor | None = None
        self._streams: Counter[str] = Counter()  # open streaming calls per tenant
        self.stored = StoredSandboxes(
            manager, self.metrics, self.db, lambda: self.store, lambda: self.node, lambda: self._on_loop
        )
        self.quotas = TenantQuotas(
            manager, self.metrics, lambda tenant: self.db(self.store.get_tenant, tenant)
        )
        # Every wake (explicit, a call on a hibernated sandbox, a connection to its exposed port) gives
        # the sandbox its vCPUs and memory back: it is admitted against its tenant's quota like a create.
        manager.admit_wake = self.quotas.admit_wake

    # ---- lifecycle ------------------------------------------------------------------------------

    @property
    def store(self) -> Store:
        if self._store is None:
            raise TartarusError("the control plane's store is not open")
        return self._store

    def open(self) -> None:
        """Open the store, make the local admin key, and mark sandboxes a previous daemon lost.

        Call after the manager has taken the state dir, taken over the sandboxes still running and
        reaped the rest: each record still live in the store that the manager does not have is lost.
        """
        self.node = node_id(self.state_dir)
        self._store = open_store(self.state_dir)
        self._on_loop = self._store.on_loop()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tartarus-store")
        self._audit_log = audit.AuditLog(self.state_dir)
        ensure_local_admin_key(self.state_dir, self.store, self.node)
        live = {r.id for r in self.manager.list()}
        # What the manager found again (hibernated sandboxes survive a restart) keeps its owner and
        # lifetime as stored.
        for row in self.store.list_sandboxes(node=self.node, live=True):
            record = self.manager.table.find(row.id)
            if record is not None:
                record.spec = dataclasses.replace(record.spec, tenant=row.tenant, labels=row.labels)
                record.timeout_s, record.expires_at = row.timeout_s, row.expires_at
        lost = self.store.mark_lost(self.node, keep=live, reason="its VM did not outlive the previous daemon")
        if lost:
            log.warning("marked %d sandboxes of the previous daemon lost: %s", len(lost), ", ".join(lost))
            audit.record(self.state_dir, "sandbox.lost", actor="daemon", node=self.node, sandboxes=lost)
            self.store.add_audit(
                "sandbox.lost", ts=time.time(), actor="daemon", detail={"node": self.node, "sandboxes": lost}
            )

    def start(self) -> None:
        """Listen to the table's changes and hand the manager the stored timeouts, which it enforces
        (a restarted daemon's included); call from the event loop."""
        self.manager.table.on_change = self.stored.changed
        self.manager.observe = self.metrics.observe
        now = time.time()
        for record in self.manager.list():
            if record.expires_at is not None:
                self.manager.schedulers.set_ttl(record.id, max(0.0, record.expires_at - now))

    @property
    def owners(self) -> dict[str, SandboxRow]:
        """The durable record of each sandbox of this daemon, as the table has it now."""
        return {r.id: r.row(self.node) for r in self.manager.list()}

    async def close(self) -> None:
        """After the manager closed: store the end of every sandbox it destroyed, then close the store."""
        if self._store is not None:
            with contextlib.suppress(Exception):
                await self.flush()
            await self.db(self.store.close)
            self._store = None
        if self._on_loop is not None:
            self._on_loop.close()
            self._on_loop = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._audit_log is not None:
            await asyncio.to_thread(self._audit_log.close)  # its last lines fsynced
            self._audit_log = None

    async def db(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a store call on the store's thread."""
        return await self._queue(fn, *args, **kwargs)

    def _queue(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
        """A store call queued on the store's thread now (calls run in the order they are queued)."""
        if self._executor is None:
            raise TartarusError("the control plane's store is not open")
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def ping(self) -> None:
        """Readiness: the store answers a trivial query on its own thread (so a wedged thread shows)."""
        await self.db(self.store.ping)

    # ---- authentication and tenancy -------------------------------------------------------------

    async def authorize(
        self,
        request: HTTPConnection,  # a WebSocket handshake too: it carries the same header
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    ) -> None:
        """Every route's dependency: hide other tenants' sandboxes (404, not 403).

        The gate (daemon/gate.py) resolved the caller's key before the body was read and left it in
        `request.state`; `credentials` only puts the bearer scheme in the OpenAPI document."""
        route = request.scope.get("route")
        if getattr(route, "path", None) in PUBLIC_ROUTES:
            return
        principal = getattr(request.state, "principal", None)
        if not isinstance(principal, Principal):
            raise missing_key()
        sandbox_id = request.path_params.get("sandbox_id")
        if sandbox_id is not None and not self.may_touch(principal, sandbox_id):
            raise NotFound(f"no sandbox {sandbox_id!r}")

    async def authenticate(self, authorization: str | None) -> tuple[Principal, Tenant | None]:
        """The caller named by an `Authorization: Bearer KEY` header, and its tenant (for its quota),
        in one trip to the store. Raises AuthError (401) without a valid key."""
        scheme, _, secret = (authorization or "").partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise missing_key()
        if looks_scoped(secret):
            return self._scoped(secret), None
        key, tenant = await self._caller(secret)
        if key is None:
            raise invalid_key()
        return Principal.of(key), tenant

    async def _caller(self, secret: str) -> tuple[ApiKey | None, Tenant | None]:
        """The key's record and its tenant: read on the event loop itself where the store allows it
        (`Store.on_loop`), else on the store's thread."""
        if self._on_loop is not None:
            with contextlib.suppress(DatabaseBusy):
                return self._on_loop.caller(secret)
        return await self.db(self.store.caller, secret)

    @functools.cached_property
    def sandbox_tokens(self) -> SandboxTokens:
        return SandboxTokens.load(self.state_dir)

    def _scoped(self, secret: str) -> Principal:
        """A sandbox-scoped credential's caller: its sandbox's tenant, confined to its scope (the gate
        refuses anything else). A signed URL's names no tenant: its sandbox's owner is looked up."""
        named = signed_sandbox(secret)
        record = self.manager.table.find(named) if named is not None else None
        verified = self.sandbox_tokens.verify(secret, record.tenant if record is not None else None)
        if verified is None:
            raise invalid_key()
        return Principal(f"sandbox:{verified.scope.sandbox_id}", verified.tenant, False, verified.scope)

    @staticmethod
    def require_admin(request: Request) -> None:
        """A route dependency: `dependencies=[Depends(control.require_admin)]` makes a route admin-only."""
        principal_of(request).require_admin()

    def may_touch(self, principal: Principal, sandbox_id: str) -> bool:
        if principal.admin:
            return True
        record = self.manager.table.find(sandbox_id)
        return record is not None and record.tenant == principal.tenant

    def visible(
        self,
        principal: Principal,
        records: Iterable[SandboxRecord],
        *,
        labels: dict[str, str],
        tenant: str | None = None,
    ) -> list[SandboxRecord]:
        """The live sandboxes this caller may see, filtered by tenant (admins) and labels."""
        if not principal.admin:
            tenant = principal.tenant
        shown = []
        for record in records:
            if tenant is not None and record.tenant != tenant:
                continue
            if all(record.labels.get(k) == v for k, v in labels.items()):
                shown.append(record)
        return shown

    async def ended(
        self, principal: Principal, *, labels: dict[str, str], tenant: str | None = None
    ) -> list[SandboxRow]:
        """Records of sandboxes that no longer run (destroyed, failed, lost), newest last."""
        await self.flush()  # the ends the table told of, stored before they are read back
        if not principal.admin:
            tenant = principal.tenant
        rows = await self.db(self.store.list_sandboxes, tenant=tenant, live=False)
        return [r for r in rows if all(r.labels.get(k) == v for k, v in labels.items())]

    # ---- admission (`daemon.tenancy`) ---------------------------------------------------------

    def usage(self, tenant: str) -> quotas.Usage:
        return self.quotas.usage(tenant)

    def checkpoints_of(self, tenant: str) -> int:
        return self.quotas.checkpoints_of(tenant)

    def admitted(self, tenant: str, wanted: quotas.Usage) -> contextlib.AbstractAsyncContextManager[None]:
        return self.quotas.admitted(tenant, wanted)

    def open_stream(self, request: HTTPConnection) -> Callable[[], None]:
        """Count a streaming call against its tenant's limit until the returned release is called (once
        its response or socket ends). Raises QuotaExceeded (429) at the limit."""
        principal = request.state.principal
        assert isinstance(principal, Principal)
        tenant = principal.tenant
        if self._streams[tenant] >= MAX_TENANT_STREAMS:
            self.metrics.quota_rejections.labels(tenant).inc()
            raise QuotaExceeded(
                f"tenant {tenant!r} already has {MAX_TENANT_STREAMS} streams open (exec, file reads,"
                " terminals): let one finish before starting another"
            )
        self._streams[tenant] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._streams[tenant] -= 1
                if not self._streams[tenant]:
                    del self._streams[tenant]

        return release

    async def new_sandboxes(
        self, request: Request, wanted: quotas.Usage, start: Start
    ) -> list[SandboxRecord]:
        """The one way new sandboxes are made through the API (create, fork, from a checkpoint): `start`
        runs under the caller's tenant quota, holding `wanted` until its sandboxes are in the table (and
        so count as usage), and they are stored before the caller answers. Sets the request's runtime
        seconds (the Server-Timing header) and audit target."""
        with self.quotas.admission(request, wanted):
            started = time.perf_counter()
            records = list(await start())
            runtime_seconds = time.perf_counter() - started
        request.state.runtime_seconds = runtime_seconds
        if records:
            request.state.audit_target = records[0].id
        await self.stored.insert(records)
        return records

    async def set_timeout(self, sandbox_id: str, timeout: float | None) -> SandboxRow:
        return await self.stored.set_timeout(sandbox_id, timeout)

    async def flush(self) -> None:
        """Wait for the store writes queued so far: the table's changes and audit rows."""
        await self.stored.flush()
        while self._audit_rows:
            await asyncio.gather(*self._audit_rows, return_exceptions=True)

    async def create(self, request: Request, spec: SandboxSpec) -> SandboxRecord:
        """Admit a create against the tenant's quota, run it, and store the new sandbox."""
        template = get_template(spec.template)
        wanted = quotas.Usage(1, spec.vcpus or template.vcpus, spec.memory_mib or template.memory_mib)
        (record,) = await self.new_sandboxes(request, wanted, lambda: self._create(spec))
        method = (
            "ready"
            if "ready" in record.timings
            else "restore"
            if "state_loaded" in record.timings
            else "boot"
        )
        backend = record.runtime.backend if record.runtime else "unknown"
        self.metrics.create_seconds.labels(method, backend).observe(request.state.runtime_seconds)
        request.state.audit_detail = {
            "template": spec.template,
            "labels": dict(spec.labels),
            "method": method,
            "backend": backend,
        }
        return record

    async def _create(self, spec: SandboxSpec) -> list[SandboxRecord]:
        return [await self.manager.create(spec)]

    # ---- audit ----------------------------------------------------------------------------------

    async def record(
        self,
        action: str,
        *,
        tenant: str | None = None,
        actor: str | None = None,
        target: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        synced: bool = True,
        **detail: Any,
    ) -> None:
        """Append to the audit log file and the audit table.

        The file's line is written (in the page cache: it survives the daemon being killed) before
        this returns, and fsynced by the log's group commit. `synced` also waits for that fsync (it
        then survives a crash of the host too) and for the table's row; without it the row is queued
        on the store's thread, ahead of any later store call of this daemon, and `flush` (which ends
        every state-changing request, after its answer) waits for it."""
        fields = {
            "tenant": tenant,
            "actor": actor,
            "target": target,
            "status": status,
            "request_id": request_id,
        }
        present = {k: v for k, v in fields.items() if v is not None}
        if self._audit_log is None:
            raise TartarusError("the control plane's store is not open")
        line = self._audit_log.append(action, **present, **detail)
        row = self._queue(
            self.store.add_audit,
            action,
            ts=time.time(),
            tenant=tenant,
            actor=actor,
            target=target,
            status=status,
            request_id=request_id,
            detail=detail,
        )
        if synced:
            await asyncio.gather(self._audit_log.synced(line), row)
            return
        self._audit_rows.add(row)
        row.add_done_callback(self._row_written)

    def _row_written(self, row: asyncio.Future[None]) -> None:
        self._audit_rows.discard(row)
        if not row.cancelled() and row.exception() is not None:
            log.error("could not store an audit row: %s", row.exception())
