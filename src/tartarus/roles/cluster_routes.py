"""The agent's routes for the cluster itself, not for tenants: only gateways and `tartarus nodes` call them
(the agent's guard has checked the agent token and the lease before a request gets here).

- `POST /v1/cluster/wake` {sandbox_id, capture, epoch}: fetch a capture from the object store and wake it
  here, under the reservation the calling gateway holds for this node (200 with the fetch and restore
  times; 503 when this node cannot, so the gateway tries another).
- `POST /v1/cluster/hibernate/{sandbox_id}`: hibernate and wait until the capture is in the object store
  (`tartarus nodes drain`); `capture` is null when this agent has no object store (`object_store`
  false) or the upload failed.
"""

from __future__ import annotations

import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tartarus.daemon.asgi import error_response
from tartarus.daemon.manager import SandboxManager
from tartarus.errors import Conflict, InvalidArgument, TartarusError
from tartarus.roles.stored import StateSync, WakeRequest

PREFIX = "/v1/cluster/"


class NoObjectStore(Conflict):
    code = "no_object_store"


def cluster_app(manager: SandboxManager, sync: StateSync | None) -> Starlette:
    async def wake(request: Request) -> Response:
        if sync is None:
            raise NoObjectStore("this agent has no object store configured: it cannot wake stored sandboxes")
        try:
            body = json.loads(await request.body())
            wanted = WakeRequest(str(body["sandbox_id"]), str(body["capture"]), int(body["epoch"]))
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidArgument(f"a wake needs sandbox_id, capture and epoch: {e}") from e
        woken = await sync.wake(wanted)
        return JSONResponse(
            {
                "id": wanted.sandbox_id,
                "fetch_s": round(woken.fetch_s, 4),
                "restore_s": round(woken.restore_s, 4),
                "raw_bytes": woken.raw_bytes,
                "fetched_bytes": woken.fetched_bytes,
            }
        )

    async def hibernate(request: Request) -> Response:
        sandbox_id = request.path_params["sandbox_id"]
        if sync is None:
            await manager.hibernate(sandbox_id)
            return JSONResponse({"id": sandbox_id, "capture": None, "object_store": False})
        capture = await sync.hibernate(sandbox_id)
        return JSONResponse({"id": sandbox_id, "capture": capture, "object_store": True})

    async def handle(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TartarusError)
        return error_response(exc)

    routes = [
        Route(PREFIX + "wake", wake, methods=["POST"]),
        Route(PREFIX + "hibernate/{sandbox_id}", hibernate, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={TartarusError: handle})
