"""`tartarus gateway`: the public API of a cluster. Stateless (everything it knows is in PostgreSQL), so
any number run side by side behind one address.

It authenticates API keys against the shared store, admits a create against the tenant's quota over
the whole cluster (`quota`), places it with the `Placer` (capacity reserved on a node before its agent
is called; another node tried when an agent refuses or fails), and forwards every other call to the
agent that owns the sandbox (`proxy`). Tenancy (and each node's share of the quota) is applied by the
agent's control plane, as `serve` applies it, for the caller the gateway names. Each
gateway also campaigns to run the reconciler (lost nodes, expired reservations); one at a time does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import psycopg
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import tartarus
from tartarus.cluster.db import Connection, connect
from tartarus.cluster.errors import NoCapacity, NodeRefused, ReservationLost
from tartarus.cluster.membership import Membership
from tartarus.cluster.model import QUARANTINE, Demand, Location, NodeView, PlacementState, Reservation
from tartarus.cluster.placement import DEFAULT_RESERVATION_S, Placer
from tartarus.cluster.reconcile import DEFAULT_GRACE_S
from tartarus.cluster.reconciler import Reconciler
from tartarus.cluster.schema import migrate
from tartarus.daemon import quotas
from tartarus.daemon.asgi import error_response
from tartarus.daemon.auth import Principal, invalid_key, missing_key
from tartarus.daemon.control import parse_labels
from tartarus.daemon.gate import DEFAULT_BODY_LIMIT, too_large
from tartarus.daemon.models import SandboxInfo
from tartarus.daemon.server import GRACE_S
from tartarus.errors import Conflict, InvalidArgument, NotFound, PolicyDenied, TartarusError
from tartarus.policy import AdmissionRequest, Policy, PolicyEngine, Verdict
from tartarus.policy.admission import template_image
from tartarus.roles import quota
from tartarus.roles.gateway_checkpoints import CheckpointRoutes
from tartarus.roles.metrics import CountRequests, GatewayMetrics, TimedPlacer
from tartarus.roles.proxy import AgentCall, Answered, NodeUnreachable, Proxy, Target, agent_headers
from tartarus.roles.stored import STORED_NODE
from tartarus.roles.token import AgentToken
from tartarus.store import SandboxRow, Store, Tenant
from tartarus.templates.built import get_template

log = logging.getLogger(__name__)

T = TypeVar("T")
CLUSTER_THREADS = 8  # placement and routing queries at once, each on its own connection
DEFAULT_VCPUS, DEFAULT_MEMORY_MIB = 1, 512  # a template this host has not built: the daemon's defaults
WAIT_S = 0.1  # between looks at a placement another gateway is waking
# The agent's headers a create passes on: its request id (for its log) and its Server-Timing.
PASSED_ON = frozenset({"x-request-id", "server-timing"})


class NodeLost(TartarusError):
    """The sandbox's node stopped renewing its lease past the grace period: the cluster gave it up."""

    code = "node_lost"
    status = 410


class NodeUnavailable(TartarusError):
    """The sandbox's node has not renewed its lease: it may come back (or be declared lost)."""

    code = "node_unavailable"
    status = 503


class WakeTimedOut(TartarusError):
    code = "wake_timed_out"
    status = 503


@dataclass(frozen=True)
class GatewayOptions:
    host: str
    port: int
    database_url: str
    token: AgentToken
    reservation_s: float = 4 * DEFAULT_RESERVATION_S  # a cold boot under emulation takes tens of seconds
    grace_s: float = DEFAULT_GRACE_S
    reconcile: bool = True
    policy: Policy = field(default_factory=Policy)  # its rules' verdicts: quarantine places by label


class Gateway:
    def __init__(self, options: GatewayOptions) -> None:
        self.options = options
        self.policy = PolicyEngine(options.policy)
        self._store: Store | None = None
        self._store_thread = ThreadPoolExecutor(1, thread_name_prefix="gateway-store")
        self._cluster_threads = ThreadPoolExecutor(CLUSTER_THREADS, thread_name_prefix="gateway-cluster")
        self._local = threading.local()
        self._conns: list[Connection] = []
        self._conns_lock = threading.Lock()
        self._sync = httpx.Client(timeout=httpx.Timeout(10, read=options.reservation_s))
        self.proxy = Proxy(
            options.token,
            httpx.AsyncClient(
                timeout=httpx.Timeout(10, read=None, write=None),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            ),
        )
        self.reconciler = Reconciler(
            options.database_url, grace_s=options.grace_s, on_sweep=lambda s: self.metrics.swept(len(s.lost))
        )
        self.metrics = GatewayMetrics(self.reconciler.interval_s)

    # ---- lifecycle ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self._in_cluster(lambda conn: migrate(conn))
        self._store = await self._in_store(Store.open, self.options.database_url)
        if self.options.reconcile:
            self.reconciler.start()
        try:
            yield
        finally:
            if self.options.reconcile:
                await asyncio.to_thread(self.reconciler.stop)
            await self.proxy.client.aclose()
            self._sync.close()
            if self._store is not None:
                await self._in_store(self._store.close)
            self._store_thread.shutdown(wait=True)
            self._cluster_threads.shutdown(wait=True)
            for conn in self._conns:
                conn.close()

    async def _in_store(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._store_thread, fn, *args)

    async def _in_cluster(self, fn: Callable[[Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._cluster_threads, self._with_conn, fn)

    def _with_conn(self, fn: Callable[[Connection], T]) -> T:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = connect(self.options.database_url)
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        try:
            return fn(conn)
        except psycopg.Error:
            conn.close()  # a broken session: the next call on this thread opens a new one
            raise

    # ---- who calls ------------------------------------------------------------------------------

    async def authenticate(self, connection: HTTPConnection) -> Principal:
        return (await self._caller(connection, with_tenant=False))[0]

    async def _caller(
        self, connection: HTTPConnection, *, with_tenant: bool
    ) -> tuple[Principal, Tenant | None]:
        """The key's holder (and, for a create, its tenant's quota) in one trip to the store."""
        scheme, _, secret = connection.headers.get("authorization", "").partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise missing_key()
        store = self._store
        assert store is not None

        key, tenant = await self._in_store(store.caller, secret)  # one statement: key and tenant
        if key is None:
            raise invalid_key()
        return Principal.of(key), tenant if with_tenant else None

    # ---- routes ---------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": tartarus.__version__, "role": "gateway"})

    async def scrape(self, request: Request) -> Response:
        """Prometheus metrics (docs/metrics.md): admin key only, as on `serve` and the agents."""
        (await self.authenticate(request)).require_admin()
        text = await self._in_cluster(lambda conn: self.metrics.render(Membership(conn).nodes()))
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def create(self, request: Request) -> Response:
        principal, tenant = await self._caller(request, with_tenant=True)
        body = await _read_limited(request, DEFAULT_BODY_LIMIT)
        data = _create_body(body)
        verdict, reason = _verdict(self.policy, principal.tenant, data)
        demand = _demand(data, quarantine=verdict == "quarantine")
        limits = quota.limits_of(tenant)
        try:
            call = self._create_call(body, principal)
            answer = await self._in_cluster(lambda conn: self._admit(conn, demand, call, principal, limits))
        except NoCapacity as e:
            if not demand.quarantine:
                raise
            raise NoCapacity(
                f"the policy quarantines this sandbox ({reason}): only nodes labelled {QUARANTINE} may run "
                f"it, and {e.message}"
            ) from e
        kept = {k: v for k, v in answer.headers.items() if k in PASSED_ON}
        return Response(answer.content, answer.status_code, headers=kept, media_type="application/json")

    def _admit(
        self,
        conn: Connection,
        demand: Demand,
        call: AgentCall,
        principal: Principal,
        limits: quotas.Limits | None,
    ) -> httpx.Response:
        """On a cluster thread: the tenant's quota over the whole cluster, then the placement (`_place`)."""
        if limits is None:
            return self._place(conn, demand, call, principal)
        store = self._store
        assert store is not None

        def live() -> list[SandboxRow]:
            return self._store_thread.submit(
                store.list_sandboxes, tenant=principal.tenant, live=True
            ).result()

        with quota.admitted(conn, principal.tenant, limits, demand, live):
            return self._place(conn, demand, call, principal)

    def _place(
        self, conn: Connection, demand: Demand, call: AgentCall, principal: Principal
    ) -> httpx.Response:
        """On a cluster thread: reserve, `call` the reserved node's agent (a create, a copy of a checkpoint),
        confirm under the id it gave. A node that does not answer or fails (5xx) is released and another
        tried; a client error (`Answered`) is the request's answer."""
        answers: list[httpx.Response] = []

        def start(reservation: Reservation) -> str:
            try:
                response = call(reservation)
            except httpx.TransportError as e:
                self.metrics.node_refusals.labels(reservation.node).inc()
                raise NodeRefused(f"node {reservation.node} did not answer: {e}") from e
            if response.status_code >= 500:
                self.metrics.node_refusals.labels(reservation.node).inc()
                raise NodeRefused(
                    f"node {reservation.node} answered {response.status_code}: {response.text[:200]}"
                )
            if response.status_code != 201:
                raise Answered(response)
            answers.append(response)
            return str(response.json()["id"])

        placer = TimedPlacer(conn, self.metrics, reservation_s=self.options.reservation_s)
        try:
            placer.place(demand, start)
        except Answered as e:
            return e.response
        except ReservationLost:
            # The node was fenced (or the reservation expired) while it created the sandbox: the cluster
            # does not count it there, so it must not run there.
            for answer in answers:
                self._destroy_unplaced(answer, principal)
            raise
        return answers[-1]

    def _create_call(self, body: bytes, principal: Principal) -> AgentCall:
        def call(reservation: Reservation) -> httpx.Response:
            return self._sync.post(
                f"http://{reservation.address}/v1/sandboxes",
                content=body,
                headers={**agent_headers(self.options.token, principal), "content-type": "application/json"},
            )

        return call

    def _destroy_unplaced(self, answer: httpx.Response, principal: Principal) -> None:
        host = answer.request.url.netloc.decode()
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            self._sync.delete(
                f"http://{host}/v1/sandboxes/{answer.json()['id']}",
                headers=agent_headers(self.options.token, principal),
            )

    async def list_sandboxes(self, request: Request) -> Response:
        """Every healthy node's answer for this caller, merged (ended ones, read from the shared store by
        each agent, once)."""
        principal = await self.authenticate(request)
        nodes = await self._in_cluster(lambda conn: Membership(conn).nodes())
        live = [Target(n.name, n.address) for n in nodes if n.healthy]
        answers = await asyncio.gather(
            *(
                self.proxy.fetch(t, principal, "GET", "/v1/sandboxes", query=request.url.query.encode())
                for t in live
            ),
            return_exceptions=True,
        )
        merged: dict[str, Any] = {}
        for target, answer in zip(live, answers, strict=True):
            if isinstance(answer, BaseException):
                log.warning("listing on node %s failed: %s", target.node, answer)
                continue
            if answer.status_code != 200:
                return Response(answer.content, answer.status_code, media_type="application/json")
            for sandbox in answer.json()["sandboxes"]:
                merged.setdefault(sandbox["id"], sandbox)
        for row in await self._stored(principal, request):
            merged.setdefault(row.id, stored_info(row))
        return JSONResponse({"sandboxes": list(merged.values())})

    async def _stored(self, principal: Principal, request: Request) -> list[SandboxRow]:
        """The caller's sandboxes hibernated in the object store (no agent has them), by its filters."""
        store = self._store
        assert store is not None
        tenant = request.query_params.get("tenant") if principal.admin else principal.tenant
        labels = parse_labels(request.query_params.getlist("label"))
        rows = await self._in_store(
            functools.partial(store.list_sandboxes, tenant=tenant, node=STORED_NODE, live=True)
        )
        return [
            r
            for r in rows
            if r.state == "hibernated" and all(r.labels.get(k) == v for k, v in labels.items())
        ]

    async def route(self, sandbox_id: str) -> Location:
        """Where the sandbox's placement is (not yet judged: see `_target`)."""
        try:
            where: Location = await self._in_cluster(lambda conn: Placer(conn).locate(sandbox_id))
        except (NotFound, InvalidArgument) as e:
            raise NotFound(f"no sandbox {sandbox_id!r}") from e
        return where

    @staticmethod
    def _target(where: Location) -> Target:
        """The agent that runs the sandbox, or a clear error when its node is not there."""
        sandbox_id = where.sandbox_id
        if where.state == PlacementState.LOST:
            raise NodeLost(
                f"sandbox {sandbox_id} was lost with node {where.node}: the node stopped renewing its lease "
                "and the cluster gave up on its sandboxes"
            )
        if not where.node_healthy:
            raise NodeUnavailable(
                f"node {where.node}, which runs sandbox {sandbox_id}, has not renewed its lease: it is "
                "unreachable or fenced; the sandbox is marked lost if the node does not come back"
            )
        return Target(where.node, where.address)

    async def to_owner(self, request: Request) -> Response:
        principal, where = await self._caller_and_placement(request)
        itself = request.url.path.rstrip("/").endswith(where.sandbox_id)  # not a sub-resource
        if where.stored and itself and request.method == "GET":
            return await self._stored_info(principal, where.sandbox_id)  # looking does not wake it
        if where.stored and itself and request.method == "DELETE":
            try:
                return await self._delete_stored(principal, where.sandbox_id)
            except Conflict as e:  # woken meanwhile: its node deletes it
                log.info("%s; the delete goes to its node", e.message)
            where = await self.route(where.sandbox_id)
        return await self.proxy.forward(request, await self._running(principal, where), principal)

    async def _delete_stored(self, principal: Principal, sandbox_id: str) -> Response:
        """Ended without waking it: its placement goes and its record says destroyed. (Its capture's
        objects stay in the bucket: collecting unreferenced chunks is not built.)"""
        await self._may_see(principal, sandbox_id)
        capture = await self._in_cluster(lambda conn: Placer(conn).ended_stored(sandbox_id))
        store = self._store
        assert store is not None
        await self._in_store(
            functools.partial(store.update_sandbox, sandbox_id, state="destroyed", ended_at=time.time())
        )
        log.info("deleted sandbox %s, hibernated in the object store as %s", sandbox_id, capture)
        return Response(status_code=204)

    async def _caller_and_placement(self, connection: HTTPConnection) -> tuple[Principal, Location]:
        """The key check and the routing lookup at once (two database trips in parallel); a caller
        without a valid key learns nothing of the sandbox, the key's error comes first."""
        caller, owner = await asyncio.gather(
            self.authenticate(connection),
            self.route(connection.path_params["sandbox_id"]),
            return_exceptions=True,
        )
        if isinstance(caller, BaseException):
            raise caller
        if isinstance(owner, BaseException):
            raise owner
        return caller, owner

    async def _running(self, principal: Principal, where: Location) -> Target:
        """The agent to forward to: a sandbox hibernated in the object store (or being woken from it
        through another gateway) is woken first, on the node placement chooses."""
        if where.stored or where.waking:
            await self._may_see(principal, where.sandbox_id)  # no one wakes another tenant's sandbox
            where = await self._in_cluster(lambda conn: self._wake(conn, where.sandbox_id))
        return self._target(where)

    async def _may_see(self, principal: Principal, sandbox_id: str) -> SandboxRow:
        store = self._store
        assert store is not None
        row = await self._in_store(store.get_sandbox, sandbox_id)
        if row is None or not (principal.admin or row.tenant == principal.tenant):
            raise NotFound(f"no sandbox {sandbox_id!r}")
        return row

    async def _stored_info(self, principal: Principal, sandbox_id: str) -> Response:
        return JSONResponse(stored_info(await self._may_see(principal, sandbox_id)))

    def _wake(self, conn: Connection, sandbox_id: str) -> Location:
        """On a cluster thread: place a wake of a stored sandbox and have the chosen agent do it (it
        confirms the placement itself). One placement row per sandbox, so of two gateways waking it at
        once one reserves and the other waits for it to run; a node that cannot wake it gets the
        reservation released (back to hibernated) and the next is tried."""
        placer = Placer(conn, reservation_s=self.options.reservation_s)
        deadline = time.monotonic() + self.options.reservation_s
        refused: list[str] = []
        while True:
            where = placer.locate(sandbox_id)
            if not (where.stored or where.waking) and where.state != PlacementState.RESERVED:
                return where
            if time.monotonic() > deadline:
                raise WakeTimedOut(
                    f"sandbox {sandbox_id} did not wake within {self.options.reservation_s:.0f} s"
                )
            if not where.stored:
                time.sleep(WAIT_S)  # another gateway's wake holds the placement: wait for it to run
                continue
            try:
                demand, capture = placer.wake_demand(sandbox_id)
                reservation = placer.reserve(demand, exclude=frozenset(refused))
            except Conflict:
                continue  # another gateway reserved it first
            except NoCapacity as e:
                if refused:
                    raise NoCapacity(f"{e.message}; refused by {', '.join(refused)}") from e
                raise
            why = self._ask_wake(reservation, capture)
            if why is None:
                continue  # woken: the next lookup finds it running there
            placer.release(reservation, why=why)
            refused.append(reservation.node)
            if len(refused) >= placer.attempts:
                raise NoCapacity(f"sandbox {sandbox_id} could not be woken: {why}")

    def _ask_wake(self, reservation: Reservation, capture: str) -> str | None:
        """None when the agent woke it; else why not."""
        body = {"sandbox_id": reservation.sandbox_id, "capture": capture, "epoch": reservation.epoch}
        try:
            answer = self._sync.post(
                f"http://{reservation.address}/v1/cluster/wake",
                json=body,
                headers={"authorization": self.options.token.header},
            )
        except httpx.TransportError as e:
            return f"node {reservation.node} did not answer the wake: {e}"
        if answer.status_code == 200:
            return None
        return f"node {reservation.node} answered the wake {answer.status_code}: {answer.text[:300]}"

    async def to_any(self, request: Request) -> Response:
        """Calls that name no sandbox (templates, keys, tenants, audit): any healthy agent answers from
        the shared store. (Images are per node: listed from one node only.)"""
        principal = await self.authenticate(request)
        nodes: list[NodeView] = await self._in_cluster(lambda conn: Membership(conn).nodes())
        healthy = [n for n in nodes if n.healthy]
        if not healthy:
            raise NodeUnreachable("no healthy node in the cluster")
        node = healthy[secrets.randbelow(len(healthy))]
        return await self.proxy.forward(request, Target(node.name, node.address), principal)

    async def terminal(self, websocket: WebSocket) -> None:
        try:
            principal, where = await self._caller_and_placement(websocket)
            target = await self._running(principal, where)
        except TartarusError as e:
            await websocket.send_denial_response(error_response(e))
            return
        await self.proxy.bridge(websocket, target, principal)


async def _read_limited(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    return bytes(body)


def _create_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError as e:
        raise InvalidArgument(f"the body is not JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("template"), str):
        raise InvalidArgument("template: a template name is required")
    return data


def _verdict(policy: PolicyEngine, tenant: str, data: dict[str, Any]) -> tuple[Verdict, str]:
    """The policy's verdict on a create, before it is placed (a quarantine verdict goes to quarantine
    capacity only); the agent admits it again under the same policy, confinement included. A rule on
    `backend` matches here only when the create names one (otherwise the agent chooses it)."""
    if not policy.policy.rules:
        return "admit", "no rule matched"
    name = str(data["template"])
    network, labels, backend = data.get("network"), data.get("labels"), data.get("backend")
    image = None
    if any(rule.match.image is not None for rule in policy.policy.rules):
        with contextlib.suppress(TartarusError):
            image = template_image(name, get_template(name).key)
    request = AdmissionRequest(
        tenant,
        name,
        str(network.get("mode", "none")) if isinstance(network, dict) else "none",
        image,
        labels if isinstance(labels, dict) else {},
        backend if isinstance(backend, str) else None,
    )
    verdict, reason, _ = policy.verdict(request)
    if verdict == "reject":
        raise PolicyDenied(f"sandbox refused by policy: {reason}")
    return verdict, reason


def _demand(data: dict[str, Any], *, quarantine: bool = False) -> Demand:
    """What the create asks of a node: its resources (the template's when not given) and template."""
    name: str = data["template"]
    vcpus, memory = data.get("vcpus"), data.get("memory_mib")
    if vcpus is None or memory is None:
        try:
            template = get_template(name)
            vcpus, memory = vcpus or template.vcpus, memory or template.memory_mib
        except TartarusError:
            vcpus, memory = vcpus or DEFAULT_VCPUS, memory or DEFAULT_MEMORY_MIB
    disk = data.get("disk_mib") or 0
    if not all(isinstance(v, int) for v in (vcpus, memory, disk)):
        raise InvalidArgument("vcpus, memory_mib and disk_mib must be integers")
    return Demand(
        sandbox_id="pending-" + secrets.token_hex(6),
        vcpus=vcpus,
        memory_mib=memory,
        disk_mib=disk,
        template=name,
        quarantine=quarantine,
    )


def stored_info(row: SandboxRow) -> dict[str, Any]:
    """A sandbox hibernated in the object store as the API shows it, from its shared record."""
    return SandboxInfo(
        id=row.id,
        template=row.template,
        state="hibernated",
        created_at=row.created_at,
        vcpus=row.vcpus,
        memory_mib=row.memory_mib,
        tenant=row.tenant,
        labels=row.labels,
        timeout=row.timeout_s,
        expires_at=row.expires_at,
    ).model_dump()


def gateway_app(options: GatewayOptions) -> Starlette:
    gateway = Gateway(options)
    everything = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]

    async def handle(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TartarusError)
        return error_response(exc)

    routes = [
        Route("/v1/health", gateway.health, methods=["GET"]),
        Route("/metrics", gateway.scrape, methods=["GET"]),
        Route("/v1/sandboxes", gateway.create, methods=["POST"]),
        Route("/v1/sandboxes", gateway.list_sandboxes, methods=["GET"]),
        WebSocketRoute("/v1/sandboxes/{sandbox_id}/pty", gateway.terminal),
        *CheckpointRoutes(gateway).routes(),  # checkpoints live in the cluster; forks and copies are placed
        Route("/v1/sandboxes/{sandbox_id}", gateway.to_owner, methods=everything),
        Route("/v1/sandboxes/{sandbox_id}/{rest:path}", gateway.to_owner, methods=everything),
        Route("/{rest:path}", gateway.to_any, methods=everything),
    ]
    app = Starlette(routes=routes, lifespan=gateway.lifespan, exception_handlers={TartarusError: handle})
    app.add_middleware(CountRequests, metrics=gateway.metrics)
    app.state.gateway = gateway
    return app


def serve_gateway(options: GatewayOptions) -> None:
    config = uvicorn.Config(
        gateway_app(options),
        host=options.host,
        port=options.port,
        timeout_graceful_shutdown=GRACE_S,
        log_config=None,
        access_log=False,
    )
    uvicorn.Server(config).run()
