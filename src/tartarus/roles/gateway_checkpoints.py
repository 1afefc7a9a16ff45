"""The gateway's checkpoint routes (issue 16): checkpoints live in the cluster, not on the node that took
them, so sandboxes start from them on any node.

- `POST /v1/sandboxes/{id}/checkpoints`: the sandbox's agent takes the checkpoint, uploads it and records
  it in `cluster.checkpoints`; if the upload or the record fails, its local copy is deleted and the error
  passed on (no checkpoint only one node could use).
- `POST /v1/checkpoints/{id}/sandboxes`: placed like a create, with the origin bonus for the node that
  took it (it has the files); the chosen agent fetches the checkpoint unless it has it, then starts the
  copy. A node that cannot (unreachable, 5xx) is given up for the next; a capture that fails its checks
  (a corrupt or missing chunk) is the answer, as it would fail anywhere.
- `POST /v1/sandboxes/{id}/fork`: a checkpoint as above, `count` copies each placed on its own, then the
  checkpoint deleted; if one copy fails the others are destroyed.
- `GET /v1/checkpoints[/{id}]`, `DELETE /v1/checkpoints/{id}`: from and on the cluster's rows; a delete
  also removes the copies nodes fetched (best effort: a node down now drops its copy when it expires).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

import httpx
from pydantic import ValidationError
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tartarus.cluster import checkpoints
from tartarus.cluster.checkpoints import StoredCheckpoint
from tartarus.cluster.db import Connection
from tartarus.cluster.errors import NodeRefused
from tartarus.cluster.membership import Membership
from tartarus.cluster.model import Demand, Location, Reservation
from tartarus.daemon import quotas
from tartarus.daemon.auth import Principal
from tartarus.daemon.models import CheckpointInfo, ForkRequest
from tartarus.errors import InvalidArgument, TartarusError
from tartarus.roles import quota
from tartarus.roles.metrics import GatewayMetrics
from tartarus.roles.proxy import AgentCall, Answered, Proxy, Target, agent_headers
from tartarus.roles.token import AgentToken
from tartarus.store import Store, Tenant

log = logging.getLogger(__name__)

FORK_TTL_S = 3600.0  # a fork's checkpoint is deleted once its copies run; this bounds a crash's leftover
# A fetch failing with these is the capture's fault, not the node's: answered, not retried elsewhere.
CAPTURE_FAULTS = frozenset({"chunk_corrupt", "object_missing", "manifest_invalid", "invalid_argument"})
JSON = {"content-type": "application/json"}


T = TypeVar("T")


class GatewayOptionsLike(Protocol):
    @property
    def token(self) -> AgentToken: ...
    @property
    def reservation_s(self) -> float: ...


class Gateway(Protocol):
    """What these routes use of `roles.gateway.Gateway` (which imports this module: no import back)."""

    @property
    def options(self) -> GatewayOptionsLike: ...
    @property
    def proxy(self) -> Proxy: ...
    @property
    def metrics(self) -> GatewayMetrics: ...
    @property
    def _sync(self) -> httpx.Client: ...
    @property
    def _store(self) -> Store | None: ...
    @property
    def _store_thread(self) -> ThreadPoolExecutor: ...

    async def authenticate(self, connection: HTTPConnection) -> Principal: ...
    async def _caller(
        self, connection: HTTPConnection, *, with_tenant: bool
    ) -> tuple[Principal, Tenant | None]: ...
    async def _caller_and_placement(self, connection: HTTPConnection) -> tuple[Principal, Location]: ...
    async def route(self, sandbox_id: str) -> Location: ...
    async def _running(self, principal: Principal, where: Location) -> Target: ...
    async def _in_cluster(self, fn: Callable[[Connection], T]) -> T: ...
    def _destroy_unplaced(self, answer: httpx.Response, principal: Principal) -> None: ...
    def _admit(
        self,
        conn: Connection,
        demand: Demand,
        call: AgentCall,
        principal: Principal,
        limits: quotas.Limits | None,
    ) -> httpx.Response: ...


def relayed(answer: httpx.Response) -> Response:
    return Response(answer.content, answer.status_code, media_type="application/json")


def info(cp: StoredCheckpoint) -> dict[str, object]:
    return CheckpointInfo(
        id=cp.id,
        sandbox_id=cp.sandbox_id,
        template=cp.template,
        captured_at=cp.captured_at,
        disk_bytes=cp.disk_bytes,
        ttl_s=cp.ttl_s,
    ).model_dump()


def _code(answer: httpx.Response) -> str:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return str(answer.json()["error"]["code"])
    return ""


class CheckpointRoutes:
    def __init__(self, gateway: Gateway) -> None:
        self.g = gateway

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/sandboxes/{sandbox_id}/checkpoints", self.create, methods=["POST"]),
            Route("/v1/sandboxes/{sandbox_id}/fork", self.fork, methods=["POST"]),
            Route("/v1/checkpoints", self.list, methods=["GET"]),
            Route("/v1/checkpoints/{checkpoint_id}", self.get, methods=["GET"]),
            Route("/v1/checkpoints/{checkpoint_id}", self.delete, methods=["DELETE"]),
            Route("/v1/checkpoints/{checkpoint_id}/sandboxes", self.copy, methods=["POST"]),
        ]

    # ---- routes ---------------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        principal, where = await self.g._caller_and_placement(request)
        target = await self.g._running(principal, where)
        body = await request.body()
        try:
            stored = await self._checkpoint(target, principal, where.sandbox_id, body)
        except Answered as e:
            return relayed(e.response)
        return JSONResponse(info(stored), status_code=201)

    async def list(self, request: Request) -> Response:
        principal = await self.g.authenticate(request)
        tenant = None if principal.admin else principal.tenant
        rows = await self.g._in_cluster(lambda conn: checkpoints.listed(conn, tenant))
        return JSONResponse({"checkpoints": [info(cp) for cp in rows]})

    async def get(self, request: Request) -> Response:
        principal = await self.g.authenticate(request)
        return JSONResponse(info(await self._find(principal, request.path_params["checkpoint_id"])))

    async def delete(self, request: Request) -> Response:
        principal = await self.g.authenticate(request)
        cid = request.path_params["checkpoint_id"]
        tenant = None if principal.admin else principal.tenant
        await self.g._in_cluster(lambda conn: checkpoints.remove(conn, cid, tenant))
        await self._drop_copies(cid, principal)
        return Response(status_code=204)

    async def copy(self, request: Request) -> Response:
        principal, tenant = await self.g._caller(request, with_tenant=True)
        cp = await self._find(principal, request.path_params["checkpoint_id"])
        body = await request.body() or b"{}"
        limits = quota.limits_of(tenant)
        answer = await self.g._in_cluster(lambda conn: self._admit_copy(conn, cp, body, principal, limits))
        if answer.status_code == 201:
            await self.g._in_cluster(lambda conn: checkpoints.used(conn, cp.id))
        return relayed(answer)

    async def fork(self, request: Request) -> Response:
        principal, tenant = await self.g._caller(request, with_tenant=True)
        try:
            count = ForkRequest.model_validate_json(await request.body() or b"{}").count
        except ValidationError as e:
            raise InvalidArgument(f"invalid fork request: {e}") from e
        where = await self.g.route(request.path_params["sandbox_id"])
        target = await self.g._running(principal, where)
        limits = quota.limits_of(tenant)
        ttl = json.dumps({"ttl_s": FORK_TTL_S}).encode()
        try:
            cp = await self._checkpoint(target, principal, where.sandbox_id, ttl)
        except Answered as e:
            return relayed(e.response)
        try:
            results = await asyncio.gather(
                *(
                    self.g._in_cluster(lambda conn: self._admit_copy(conn, cp, b"{}", principal, limits))
                    for _ in range(count)
                ),
                return_exceptions=True,
            )
            made = [r for r in results if isinstance(r, httpx.Response) and r.status_code == 201]
            if len(made) < count:
                await asyncio.gather(*(self._destroy(r, principal) for r in made), return_exceptions=True)
                for r in results:
                    if isinstance(r, BaseException):
                        raise r
                return relayed(next(r for r in results if isinstance(r, httpx.Response) and r not in made))
            return JSONResponse({"sandboxes": [r.json() for r in made]}, status_code=201)
        finally:
            with contextlib.suppress(TartarusError):
                await self.g._in_cluster(lambda conn: checkpoints.remove(conn, cp.id, None))
            await self._drop_copies(cp.id, principal)

    # ---- helpers --------------------------------------------------------------------------------

    async def _find(self, principal: Principal, cid: str) -> StoredCheckpoint:
        tenant = None if principal.admin else principal.tenant
        found: StoredCheckpoint = await self.g._in_cluster(lambda conn: checkpoints.find(conn, cid, tenant))
        return found

    async def _checkpoint(
        self, target: Target, principal: Principal, sandbox_id: str, body: bytes
    ) -> StoredCheckpoint:
        """Taken on the sandbox's node, uploaded and recorded; its local copy deleted if that fails."""
        client = self.g.proxy.client
        url = f"http://{target.address}"
        try:
            taken = await client.post(
                f"{url}/v1/sandboxes/{sandbox_id}/checkpoints",
                content=body or b"{}",
                headers={**agent_headers(self.g.options.token, principal), **JSON},
            )
        except httpx.TransportError as e:
            raise self.g.proxy._unreachable(target, e) from e
        if taken.status_code != 201:
            raise Answered(taken)
        cid = str(taken.json()["id"])
        try:
            try:
                stored = await client.post(
                    f"{url}/v1/cluster/checkpoints/{cid}/store",
                    headers={"authorization": self.g.options.token.header},
                )
            except httpx.TransportError as e:
                raise self.g.proxy._unreachable(target, e) from e
            if stored.status_code != 201:
                raise Answered(stored)
            return StoredCheckpoint(**stored.json())
        except BaseException:
            with contextlib.suppress(httpx.HTTPError):
                await client.delete(
                    f"{url}/v1/checkpoints/{cid}", headers=agent_headers(self.g.options.token, principal)
                )
            raise

    async def _drop_copies(self, cid: str, principal: Principal) -> None:
        """Every healthy node deletes its copy of the checkpoint (the one that took it, any that fetched
        it)."""
        nodes = await self.g._in_cluster(lambda conn: Membership(conn).nodes())
        answers = await asyncio.gather(
            *(
                self.g.proxy.fetch(Target(n.name, n.address), principal, "DELETE", f"/v1/checkpoints/{cid}")
                for n in nodes
                if n.healthy
            ),
            return_exceptions=True,
        )
        for answer in answers:
            if isinstance(answer, BaseException):
                log.warning("a node did not delete its copy of checkpoint %s: %s", cid, answer)

    async def _destroy(self, answer: httpx.Response, principal: Principal) -> None:
        host = answer.request.url.netloc.decode()
        await self.g.proxy.client.delete(
            f"http://{host}/v1/sandboxes/{answer.json()['id']}",
            headers=agent_headers(self.g.options.token, principal),
        )

    def _admit_copy(
        self,
        conn: Connection,
        cp: StoredCheckpoint,
        body: bytes,
        principal: Principal,
        limits: quotas.Limits | None,
    ) -> httpx.Response:
        """On a cluster thread: placed as a create is (`Gateway._admit`), with the origin node's bonus; the
        chosen agent fetches the checkpoint first if it lacks it."""
        demand = Demand(
            sandbox_id="pending-" + secrets.token_hex(6),
            vcpus=cp.vcpus,
            memory_mib=cp.memory_mib,
            disk_mib=0,
            template=cp.template,
            origin=cp.node,  # the bonus of the node that has the checkpoint's files already
        )
        g = self.g

        def copy(reservation: Reservation) -> httpx.Response:
            url = f"http://{reservation.address}"
            fetched = g._sync.post(
                f"{url}/v1/cluster/checkpoints/{cp.id}/fetch",
                json={"capture": cp.capture},
                headers={"authorization": g.options.token.header},
            )
            if fetched.status_code != 200:
                if fetched.status_code >= 500 and _code(fetched) not in CAPTURE_FAULTS:
                    raise NodeRefused(
                        f"node {reservation.node} could not fetch checkpoint {cp.id}: {fetched.text[:200]}"
                    )
                raise Answered(fetched)
            return g._sync.post(
                f"{url}/v1/checkpoints/{cp.id}/sandboxes",
                content=body,
                headers={**agent_headers(g.options.token, principal), **JSON},
            )

        return g._admit(conn, demand, copy, principal, limits)
