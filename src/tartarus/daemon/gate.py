"""The door of the API, in front of FastAPI: the caller's key first (a sandbox-scoped credential only
within its scope: daemon/scoped.py), then a bounded read of the body.

FastAPI reads and parses a JSON body before any dependency runs, so a key checked in a dependency comes
too late: one keyless request could make the daemon hold a gigabyte before its 401. Here the key is
checked from the headers alone (nothing of the body is read without one), and a body is read only up
to its route's limit (413 beyond, from `Content-Length` before reading anything when it says so).
File uploads are streamed to the guest as they arrive and have no limit here. Plain ASGI, like the
other middlewares, so streamed responses pass through untouched.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tartarus.daemon.asgi import error_response, header
from tartarus.errors import AuthError, PayloadTooLarge, PermissionDenied

if TYPE_CHECKING:
    from tartarus.daemon.control import ControlPlane

MiB = 1 << 20
DEFAULT_BODY_LIMIT = 1 * MiB
# Routes whose bodies may be larger: (method, path, limit); None: streamed, never held whole.
BODY_LIMITS: tuple[tuple[str, re.Pattern[str], int | None], ...] = (
    ("PUT", re.compile(r"^/v1/sandboxes/[^/]+/files$"), None),
    # `stdin` in base64: the guest agent buffers up to 16 MiB of a command's stdin.
    ("POST", re.compile(r"^/v1/sandboxes/[^/]+/exec$"), 24 * MiB),
    # `code` is up to 1 Mi characters, each up to 6 bytes once JSON-escaped.
    ("POST", re.compile(r"^/v1/sandboxes/[^/]+/code$"), 8 * MiB),
)


def body_limit(method: str, path: str) -> int | None:
    """How many body bytes the daemon reads for this request before refusing it (None: no limit)."""
    for route_method, pattern, limit in BODY_LIMITS:
        if method == route_method and pattern.match(path):
            return limit
    return DEFAULT_BODY_LIMIT


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the request body is larger than this route's limit of {limit // MiB} MiB "
        "(files go in with PUT /v1/sandboxes/{id}/files, which streams)"
    )


async def read_body(scope: Scope, receive: Receive, limit: int) -> Message:
    """The whole body as one `http.request` message (or the disconnect that cut it short); raises
    PayloadTooLarge as soon as it is known to exceed `limit`, having held at most `limit` bytes."""
    declared = header(scope, b"content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return message
        body += message.get("body", b"")
        if len(body) > limit:
            raise too_large(limit)
        if not message.get("more_body", False):
            return {"type": "http.request", "body": bytes(body), "more_body": False}


class Gate:
    def __init__(self, app: ASGIApp, control: ControlPlane, public: frozenset[str]) -> None:
        self.app = app
        self.control = control
        self.public = public  # paths that answer without a key (health)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope["path"] not in self.public:
            try:
                principal, tenant = await self.control.authenticate(header(scope, b"authorization"))
            except AuthError as e:
                await error_response(e)(scope, receive, send)
                return
            if principal.scope is not None and not principal.scope.allows(
                scope.get("method", "GET"), scope["path"]
            ):
                refused = PermissionDenied(
                    f"this credential opens sandbox {principal.scope.sandbox_id}'s insides only"
                )
                await error_response(refused)(scope, receive, send)
                return
            state = scope.setdefault("state", {})
            state["principal"], state["tenant"] = principal, tenant
        limit = body_limit(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if limit is not None:
            try:
                first: Message | None = await read_body(scope, receive, limit)
            except PayloadTooLarge as e:
                await error_response(e)(scope, receive, send)
                return
            outer = receive

            async def replay() -> Message:
                nonlocal first
                if first is not None:
                    message, first = first, None
                    return message
                return await outer()  # later: the client's disconnect, for streamed responses

            receive = replay
        await self.app(scope, receive, send)
