"""The daemon's REST API (/v1): the routers of `tartarus.daemon.routes` behind the key gate, the
request bookkeeping and one error shape.

Errors always come back as `{"error": {"code", "message"}}` with a status that matches the code; a
streamed exec reports late failures as a final `error` event instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import tartarus
from tartarus.daemon.asgi import error_response
from tartarus.daemon.config import DaemonConfig
from tartarus.daemon.control import PUBLIC_ROUTES, ControlPlane
from tartarus.daemon.gate import Gate
from tartarus.daemon.logs import new_request_id, request_id
from tartarus.daemon.manager import SandboxManager
from tartarus.daemon.models import ErrorBody, ErrorDetail
from tartarus.daemon.requests import RequestMiddleware
from tartarus.daemon.routes import (
    checkpoints,
    code,
    exec,
    files,
    health,
    images,
    processes,
    sandboxes,
    templates,
    tenants,
    terminal,
    tokens,
    watch,
)
from tartarus.daemon.routes.deps import Daemon
from tartarus.errors import InvalidArgument, TartarusError
from tartarus.images.cache import ImageCache

log = logging.getLogger(__name__)

MAX_CONCURRENT_CONVERSIONS = 2  # image conversions at once (routes/images.py)
ROUTERS = (
    health,
    sandboxes,
    checkpoints,
    exec,
    code,
    processes,
    files,
    watch,
    terminal,
    tokens,
    templates,
    images,
    tenants,
)


class UnexpectedErrors:
    """A bug, not a client error: log it whole and answer with the documented body shape. (Starlette's
    own catch-all re-raises after answering, and the server then resets the connection.) Plain ASGI:
    `@app.middleware("http")` would pass every response, streamed ones too, through an extra task and
    memory streams. The answer names the request id, never the exception: its text can hold host
    paths and other tenants' names; the log line under that id has it whole."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            rid = scope.get("state", {}).get("request_id") or new_request_id(None)
            token = request_id.set(rid)
            try:
                log.exception("unhandled error on %s %s", scope["method"], scope.get("path", ""))
            finally:
                request_id.reset(token)
            if started:
                raise  # too late for an error body: the server closes the connection
            response = error_response(TartarusError(f"internal error (request {rid}): see the daemon's log"))
            response.headers["x-request-id"] = rid
            await response(scope, receive, send)


def create_app(
    state_dir: Path, config: DaemonConfig | None = None, control_type: type[ControlPlane] = ControlPlane
) -> FastAPI:
    """The daemon's app; a cluster agent passes its own `control_type` (callers named by its gateways)."""
    manager = SandboxManager(state_dir, config)
    control = control_type(state_dir, manager)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager.open()
        try:
            await manager.adopt_running()
            control.open()
            manager.start_pools()
            control.start()
            yield
        finally:
            await manager.close()
            await control.close()

    app = FastAPI(
        title="Tartarus",
        version=tartarus.__version__,
        lifespan=lifespan,
        # Every route needs an API key (bar health); it also hides other tenants' sandboxes.
        dependencies=[Depends(control.authorize)],
        # FastAPI's own /openapi.json and docs pages would bypass that: the document is served
        # behind the same key (routes/health.py), and `tartarus openapi` writes it from the app object.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.manager = manager
    app.state.control = control
    app.state.daemon = Daemon(
        manager, control, ImageCache(manager.config.image_root), asyncio.Semaphore(MAX_CONCURRENT_CONVERSIONS)
    )
    app.add_middleware(Gate, control=control, public=PUBLIC_ROUTES)  # before any body is read
    app.add_middleware(RequestMiddleware, control=control)  # outside the gate: refusals are logged
    app.add_middleware(UnexpectedErrors)  # outside RequestMiddleware: catches what escapes it too
    for module in ROUTERS:
        app.include_router(module.router)

    @app.exception_handler(TartarusError)
    async def tartarus_error(request: Request, exc: TartarusError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Routing errors (unknown path, wrong method) keep the documented body shape too.
        codes = {404: "not_found", 405: "method_not_allowed"}
        detail = ErrorDetail(code=codes.get(exc.status_code, "http_error"), message=str(exc.detail))
        return JSONResponse(
            ErrorBody(error=detail).model_dump(exclude_none=True), exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(WebSocketRequestValidationError)
    async def validation_error(
        request: Request, exc: RequestValidationError | WebSocketRequestValidationError
    ) -> JSONResponse:
        # A WebSocket handshake gets the same body, as an HTTP response refusing the upgrade.
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error_response(InvalidArgument("; ".join(parts) or "invalid request"))

    return app


def dumps_openapi(app: FastAPI) -> str:
    return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"
