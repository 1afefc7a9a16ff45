"""The E2B endpoint: one ASGI app on its own port, at the root path, as `E2B_API_URL` and
`E2B_SANDBOX_URL` both point at it. A request that names a sandbox (routing.py) is envd's, or the code
interpreter's (port 49999), once its token checks out; any other is the control plane's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from tartarus.e2b import control, envd, interpreter
from tartarus.e2b.layer import Layer
from tartarus.e2b.routing import ENVD_PORT, INTERPRETER_PORT, RoutingError, Target, target
from tartarus.e2b.tokens import credential
from tartarus.e2b.upstream import UpstreamError


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


# Control-plane paths no sandbox port is served under here (envd's are /files, /health and RPCs; the
# interpreter's /execute and /contexts): some SDK releases (2.26) send their routing headers to the API too.
CONTROL_PATHS = ("/sandboxes", "/v2/sandboxes")


def _control_call(scope: Scope) -> bool:
    path: str = scope.get("path", "")
    return _header(scope, b"x-api-key") is not None and (
        path in CONTROL_PATHS or path.startswith(tuple(p + "/" for p in CONTROL_PATHS))
    )


def _is_rpc(path: str) -> bool:
    return path.count("/") == 2 and "." in path.split("/")[1]


def _refusal(scope: Scope, status: int, connect_code: str, message: str) -> JSONResponse:
    """A data-plane refusal in the caller's dialect: Connect's for RPCs, envd's HTTP one otherwise."""
    code: str | int = connect_code if _is_rpc(scope.get("path", "")) else status
    return JSONResponse({"code": code, "message": message}, status)


def control_app() -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.include_router(control.router())

    @app.exception_handler(control.E2BError)
    async def e2b_error(request: Request, exc: control.E2BError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(UpstreamError)
    async def upstream_error(request: Request, exc: UpstreamError) -> JSONResponse:
        return control.from_upstream(exc).response()

    @app.exception_handler(httpx.TransportError)
    async def daemon_unreachable(request: Request, exc: httpx.TransportError) -> JSONResponse:
        return control.E2BError(503, "the Tartarus daemon is not reachable").response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return control.E2BError(400, problems or "invalid request").response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return control.E2BError(exc.status_code, str(exc.detail)).response()

    return app


def envd_app() -> Starlette:
    app = envd.create_app()

    async def http_error(request: Any, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"code": exc.status_code, "message": str(exc.detail)}, exc.status_code)

    async def daemon_unreachable(request: Any, exc: Exception) -> JSONResponse:
        return JSONResponse({"code": 503, "message": "the Tartarus daemon is not reachable"}, 503)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(httpx.TransportError, daemon_unreachable)
    return app


def interpreter_app() -> Starlette:
    app = interpreter.create_app()

    async def daemon_unreachable(request: Any, exc: Exception) -> JSONResponse:
        return JSONResponse({"code": 503, "message": "the Tartarus daemon is not reachable"}, 503)

    app.add_exception_handler(httpx.TransportError, daemon_unreachable)
    return app


def presented(where: Target, scope: Scope) -> str | None:
    """The sandbox-scoped credential the request presents (tokens.py), or None."""
    return credential(
        where,
        scope["method"],
        scope["path"],
        scope.get("query_string", b""),
        _header(scope, b"x-access-token"),
        _header(scope, b"e2b-traffic-access-token"),
    )


class E2BApp:
    """Routes each request to the control plane or to a sandbox's envd; `make_layer` is called at
    start-up, in the serving loop (the daemon's client belongs to that loop)."""

    def __init__(self, make_layer: Callable[[], Layer]) -> None:
        self._make_layer = make_layer
        self.control = control_app()
        self.envd = envd_app()
        self.interpreter = interpreter_app()
        self.layer: Layer | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # no WebSocket route (yet): PTYs go over Connect in E2B
            await send({"type": "websocket.close", "code": 1008})
            return
        try:
            where = target(
                _header(scope, b"e2b-sandbox-id"),
                _header(scope, b"e2b-sandbox-port"),
                _header(scope, b"host"),
            )
        except RoutingError as e:
            await _refusal(scope, 400, "invalid_argument", str(e))(scope, receive, send)
            return
        if where is None or _control_call(scope):
            await self.control(scope, receive, send)
            return
        assert self.layer is not None, "served before start-up"
        found = presented(where, scope)
        if found is None:
            refusal = _refusal(
                scope, 401, "unauthenticated", "the sandbox's access token is missing or wrong"
            )
            await refusal(scope, receive, send)
            return
        if where.port not in (ENVD_PORT, INTERPRETER_PORT):
            message = f"port {where.port} is not served by Tartarus's E2B endpoint yet"
            await _refusal(scope, 501, "unimplemented", message)(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["e2b_sandbox"], state["e2b_credential"] = where.sandbox_id, found
        await (self.envd if where.port == ENVD_PORT else self.interpreter)(scope, receive, send)

    def install(self, layer: Layer) -> None:
        self.layer = layer
        self.control.state.layer = layer
        self.envd.state.layer = layer
        self.interpreter.state.layer = layer

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.install(self._make_layer())
                except Exception as e:
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.layer is not None:
                    await self.layer.watchers.close()
                    await self.layer.upstream.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return
