"""What route handlers take from the daemon, as FastAPI dependencies, and the holds a call keeps on a
sandbox for as long as it runs.

A call on a sandbox holds it (no idle hibernation, woken first if hibernated) through exactly one
context manager: `manager.use` for a call answered in one response, `stream_hold` for one whose
response streams (its hold passes to the response and ends when the stream does, however it ends).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends
from fastapi.responses import StreamingResponse
from starlette.requests import HTTPConnection, Request
from starlette.types import Receive, Scope, Send

from tartarus.daemon.auth import Principal
from tartarus.daemon.control import ControlPlane, principal_of
from tartarus.daemon.manager import SandboxManager
from tartarus.daemon.models import ErrorBody
from tartarus.images.cache import ImageCache
from tartarus.sandbox.sandbox import Sandbox

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 423, 429, 502, 507)
}


@dataclass(frozen=True)
class Daemon:
    """The parts of one daemon its routes use (kept in `app.state.daemon`)."""

    manager: SandboxManager
    control: ControlPlane
    images: ImageCache
    # Image conversions are CPU- and disk-heavy (a worker process each); more at once only thrash.
    conversions: asyncio.Semaphore


def daemon(connection: HTTPConnection) -> Daemon:
    found = connection.app.state.daemon
    assert isinstance(found, Daemon)
    return found


# The dependencies are coroutines: FastAPI runs a plain `def` dependency on a worker thread, a hop
# per dependency per request (on a loaded host, milliseconds) for what is an attribute lookup.


async def daemon_parts(connection: HTTPConnection) -> Daemon:
    return daemon(connection)


async def manager(connection: HTTPConnection) -> SandboxManager:
    return daemon(connection).manager


async def control(connection: HTTPConnection) -> ControlPlane:
    return daemon(connection).control


async def principal(request: Request) -> Principal:
    return principal_of(request)


async def require_admin(request: Request) -> None:
    """`dependencies=[Depends(require_admin)]` makes a route admin-only (403 for a tenant key)."""
    principal_of(request).require_admin()


Manager = Annotated[SandboxManager, Depends(manager)]
Control = Annotated[ControlPlane, Depends(control)]
Caller = Annotated[Principal, Depends(principal)]
AdminOnly = [Depends(require_admin)]


@contextlib.contextmanager
def _stream_slot(control: ControlPlane, connection: HTTPConnection) -> Iterator[None]:
    release = control.open_stream(connection)
    try:
        yield
    finally:
        release()


class StreamHold:
    """A streaming call's hold on its sandbox and its slot among the tenant's open streams."""

    def __init__(self, sandbox: Sandbox, stack: contextlib.AsyncExitStack) -> None:
        self.sandbox = sandbox
        self._stack: contextlib.AsyncExitStack | None = stack

    def respond(self, body: AsyncGenerator[bytes, None], **kwargs: Any) -> StreamingResponse:
        """The response that streams `body`; the hold is the response's from now on."""
        stack, self._stack = self._stack, None
        assert stack is not None, "a hold passes to one response"
        return HeldStream(body, stack, **kwargs)

    async def release(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()


@contextlib.asynccontextmanager
async def stream_hold(connection: HTTPConnection, sandbox_id: str) -> AsyncIterator[StreamHold]:
    """Hold the sandbox for a streaming call: refusals (unknown sandbox, the tenant's stream limit)
    raise here, before any response starts. The hold ends with the block unless `respond` passed it
    to a response (a WebSocket session simply runs inside the block)."""
    parts = daemon(connection)
    stack = contextlib.AsyncExitStack()
    try:
        stack.enter_context(_stream_slot(parts.control, connection))
        sandbox = await stack.enter_async_context(parts.manager.use(sandbox_id))
    except BaseException:
        await stack.aclose()
        raise
    hold = StreamHold(sandbox, stack)
    try:
        yield hold
    finally:
        await hold.release()  # a no-op once `respond` passed the hold to a response


class HeldStream(StreamingResponse):
    """A streamed response that ends its hold when it ends: the body finished, failed, or the client
    went away (the body is closed first, so what it runs in the guest stops before the hold ends)."""

    def __init__(
        self, body: AsyncGenerator[bytes, None], hold: contextlib.AsyncExitStack, **kwargs: Any
    ) -> None:
        super().__init__(body, **kwargs)
        self._body = body
        self._hold = hold

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._body.aclose()
            finally:
                await self._hold.aclose()
