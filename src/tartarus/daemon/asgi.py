"""What the daemon's plain ASGI layers (the gate, request bookkeeping, the catch-all) and its routes
share: a request header read from the scope, and the documented error body for a TartarusError."""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import Scope

from tartarus.daemon.models import ErrorBody, ErrorDetail, ReadyCheck
from tartarus.errors import GuestError, NotReady, TartarusError


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header `name` (lower case), as the client sent it."""
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def error_response(exc: TartarusError) -> JSONResponse:
    """`{"error": {"code", "message", ...}}` with the status that matches the code (to a WebSocket
    handshake too, as an HTTP response refusing the upgrade)."""
    errno_ = exc.errno if isinstance(exc, GuestError) else None
    checks = [ReadyCheck.model_validate(c) for c in exc.checks] if isinstance(exc, NotReady) else None
    body = ErrorBody(error=ErrorDetail(code=exc.code, message=exc.message, errno=errno_, checks=checks))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=exc.status)
