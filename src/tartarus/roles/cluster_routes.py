"""The agent's routes for the cluster itself, not for tenants: only gateways and `tartarus nodes` call them
(the agent's guard has checked the agent token and the lease before a request gets here).

- `POST /v1/cluster/wake` {sandbox_id, capture, epoch}: fetch a capture from the object store and wake it
  here, under the reservation the calling gateway holds for this node (200 with the fetch and restore
  times; 503 when this node cannot, so the gateway tries another).
- `POST /v1/cluster/hibernate/{sandbox_id}`: hibernate and wait until the capture is in the object store
  (`tartarus nodes drain`); `capture` is null when this agent has no object store (`object_store`
  false) or the upload failed.
- `POST /v1/cluster/checkpoints/{checkpoint_id}/store`: upload this node's checkpoint and record it in the
  cluster (201 with the record; 409 no_object_store without a store).
- `POST /v1/cluster/checkpoints/{checkpoint_id}/fetch` {capture}: have the checkpoint here, downloading it
  unless this node has it (200 with the bytes fetched: 0 when it had it).
"""

from __future__ import annotations

import dataclasses
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tartarus.daemon.asgi import error_response
from tartarus.daemon.manager import SandboxManager
from tartarus.errors import Conflict, InvalidArgument, TartarusError
from tartarus.roles.checkpoint_sync import CheckpointSync
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

    copies = CheckpointSync(sync) if sync is not None else None

    def checkpoint_sync() -> CheckpointSync:
        if copies is None:
            raise NoObjectStore("this agent has no object store configured: checkpoints stay on one node")
        return copies

    async def store_checkpoint(request: Request) -> Response:
        stored = await checkpoint_sync().store(request.path_params["checkpoint_id"])
        return JSONResponse(dataclasses.asdict(stored), status_code=201)

    async def fetch_checkpoint(request: Request) -> Response:
        try:
            capture = str(json.loads(await request.body())["capture"])
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidArgument(f"a checkpoint fetch needs its capture: {e}") from e
        fetched = await checkpoint_sync().fetch(request.path_params["checkpoint_id"], capture)
        return JSONResponse(dataclasses.asdict(fetched))

    async def handle(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TartarusError)
        return error_response(exc)

    routes = [
        Route(PREFIX + "wake", wake, methods=["POST"]),
        Route(PREFIX + "hibernate/{sandbox_id}", hibernate, methods=["POST"]),
        Route(PREFIX + "checkpoints/{checkpoint_id}/store", store_checkpoint, methods=["POST"]),
        Route(PREFIX + "checkpoints/{checkpoint_id}/fetch", fetch_checkpoint, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={TartarusError: handle})
