"""Per-request bookkeeping as plain ASGI middleware: request IDs, access logs, metrics, the audit trail.

Plain ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched. A state-changing call
by an authenticated caller is audited when its response starts, before the client learns the outcome
(a request refused for its key is only logged and counted). A WebSocket session (an
interactive terminal) counts as one: it is audited when the handshake is accepted (status 101) or
refused (the refusal's HTTP status), and logged when it ends.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tartarus.daemon.asgi import header
from tartarus.daemon.auth import Principal
from tartarus.daemon.logs import new_request_id, request_id
from tartarus.daemon.pools import DeferredRefills, refills_deferred

if TYPE_CHECKING:
    from tartarus.daemon.control import ControlPlane

log = logging.getLogger("tartarus.access")

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
# A sandbox's own work (create, exec, files, hibernate, delete...) is answered once its audit line is
# written (it survives the daemon being killed) and fsynced by the group commit right after: its other
# records (the store, SQLite WAL with synchronous=NORMAL) survive a crash of the daemon but not of the
# host either. Credentials, tenancy and verdicts (keys, tenants and quotas, sandbox tokens, quarantine
# and release, images, gc) wait for their fsync before answering.
SANDBOX_WORK = ("/v1/sandboxes", "/v1/checkpoints")
VERDICTS = ("/quarantine", "/release", "/tokens")
WEBSOCKET = "WEBSOCKET"  # the "method" of a WebSocket session in logs, metrics and the audit trail
EXEC_ROUTE = "/v1/sandboxes/{sandbox_id}/exec"


class RequestMiddleware:
    def __init__(self, app: ASGIApp, control: ControlPlane) -> None:
        self.app = app
        self.control = control

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id(header(scope, b"x-request-id"))
        token = request_id.set(rid)
        scope.setdefault("state", {})["request_id"] = rid  # for the catch-all's answer (app.py)
        method: str = scope["method"]
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if method in MUTATING:
                    await self._audit(scope, method, status, rid)
                headers = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                runtime = scope.get("state", {}).get("runtime_seconds")
                if runtime is not None:
                    # What the control plane added on top of the runtime's own work (auth, quota,
                    # store, audit), up to the response headers.
                    overhead = time.perf_counter() - started - runtime
                    self.control.metrics.overhead_seconds.observe(overhead)
                    timing = f"runtime;dur={runtime * 1000:.3f}, api;dur={overhead * 1000:.3f}"
                    headers.append((b"server-timing", timing.encode()))
                message["headers"] = headers
            await send(message)
            if message["type"] == "http.response.start" and refills is not None:
                refills.release()  # answered (and audited): the pools may spawn replacements now

        refills: DeferredRefills | None = None
        try:
            with refills_deferred() as refills:  # a create answers before its pooled VMM is replaced
                await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            if route == EXEC_ROUTE and status == 200:
                self.control.metrics.exec_seconds.observe(elapsed)
            await self._finish(scope, method, route, status, elapsed)
            request_id.reset(token)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid = new_request_id(header(scope, b"x-request-id"))
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 0  # until the handshake is answered; 101 once accepted

        async def send_with_audit(message: Message) -> None:
            nonlocal status
            kind = message["type"]
            if status == 0 and kind in (
                "websocket.accept",
                "websocket.http.response.start",
                "websocket.close",
            ):
                # A close before accepting is a refusal the server answers with 403.
                status = {"websocket.accept": 101, "websocket.close": 403}.get(kind) or int(message["status"])
                await self._audit(scope, WEBSOCKET, status, rid)
                if kind != "websocket.close":
                    message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_audit)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            await self._finish(scope, WEBSOCKET, route, status or 500, time.perf_counter() - started)
            request_id.reset(token)

    async def _finish(self, scope: Scope, method: str, route: str, status: int, elapsed: float) -> None:
        """Metrics and the access log line; then the sandbox's stored record, if the call may have
        changed it."""
        metrics = self.control.metrics
        metrics.requests.labels(method, route, str(status)).inc()
        metrics.request_seconds.labels(method, route).observe(elapsed)
        principal = _principal(scope)
        log.info(
            "%s %s %d",
            method,
            scope.get("path", ""),
            status,
            extra={
                "method": method,
                "path": scope.get("path", ""),
                "route": route,
                "status": status,
                "duration_ms": round(elapsed * 1000, 3),
                "tenant": principal.tenant if principal else None,
                "key_id": principal.key_id if principal else None,
            },
        )
        if method in MUTATING or method == WEBSOCKET:
            await self.control.flush()  # the changes it made to sandboxes, stored before it ends

    async def _audit(self, scope: Scope, method: str, status: int, rid: str) -> None:
        """Record what an authenticated caller did. A refused key is not audited: anyone could fill
        the trail with fsynced lines; the access log and the request metrics count refusals."""
        principal = _principal(scope)
        if principal is None:
            return
        state: dict[str, Any] = scope.get("state", {})
        route = str(getattr(scope.get("route"), "path", scope.get("path", "")))
        target = state.get("audit_target") or scope.get("path_params", {}).get("sandbox_id")
        await self.control.record(
            f"{method} {route}",
            synced=synced_before_answer(route),
            tenant=principal.tenant,
            actor=principal.key_id,
            target=target,
            status=status,
            request_id=rid,
            **state.get("audit_detail", {}),
        )


def synced_before_answer(route: str) -> bool:
    """Whether a call's audit line must be fsynced before it is answered (see SANDBOX_WORK)."""
    return route.endswith(VERDICTS) or not route.startswith(SANDBOX_WORK)


def _principal(scope: Scope) -> Principal | None:
    principal = scope.get("state", {}).get("principal")
    return principal if isinstance(principal, Principal) else None
