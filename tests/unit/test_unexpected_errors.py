"""A bug in a handler answers 500 with the documented error body (plain-ASGI catch-all)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tartarus.daemon.app import UnexpectedErrors
from tartarus.daemon.logs import JsonFormatter


async def broken(request: Request) -> Response:
    raise RuntimeError("boom")


async def broken_midway(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield b"partial"
        raise RuntimeError("midway")

    return StreamingResponse(body())


# Where the daemon has it: a user middleware, inside Starlette's own ServerErrorMiddleware.
app = Starlette(
    routes=[Route("/broken", broken), Route("/midway", broken_midway)],
    middleware=[Middleware(UnexpectedErrors)],
)


async def _get(path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.get(path)


def test_an_unhandled_error_is_a_500_with_the_error_body() -> None:
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tartarus.daemon.app")
    logger.addHandler(handler)
    try:
        response = asyncio.run(_get("/broken"))
    finally:
        logger.removeHandler(handler)
    assert response.status_code == 500
    rid = response.headers["x-request-id"]
    # The exception's text stays in the log (it can name host paths); the caller gets the request id.
    message = f"internal error (request {rid}): see the daemon's log"
    assert response.json() == {"error": {"code": "internal", "message": message}}
    [entry] = [json.loads(line) for line in lines.getvalue().splitlines()]
    assert entry["request_id"] == rid and "RuntimeError: boom" in entry["exc"]


def test_an_error_after_the_response_started_is_not_masked() -> None:
    with pytest.raises(RuntimeError, match="midway"):
        asyncio.run(_get("/midway"))
