"""Interactive terminals: a WebSocket bridged to a command running on a pseudo-terminal in the guest.

Binary messages carry terminal bytes both ways; text messages carry JSON control: `resize` from the
client, `exit` (or `error`) from the server just before it closes. The command dies with the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from tartarus.daemon.control import parse_pairs
from tartarus.errors import GuestError, InvalidArgument, TartarusError
from tartarus.runtime.agent import Exit, Process, PtySize

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_INTERNAL = 1011  # the sandbox failed under the session
MAX_CONTROL = 4096  # bytes of one JSON control message
# What sending to or receiving from a client that already left raises (Starlette: RuntimeError once the
# socket is closed; the server: OSError on a broken connection).
_GONE = (WebSocketDisconnect, RuntimeError, OSError)


def parse_env(pairs: list[str]) -> dict[str, str]:
    """`KEY=VALUE` query parameters."""
    return parse_pairs(pairs, "env")


def parse_control(text: str) -> PtySize:
    """A client's control message; only `{"type": "resize", "rows": R, "cols": C}` exists."""
    if len(text) > MAX_CONTROL:
        raise InvalidArgument(f"control message longer than {MAX_CONTROL} bytes")
    try:
        message = json.loads(text)
    except ValueError as e:
        raise InvalidArgument(f"control message is not JSON: {e}") from e
    if not isinstance(message, dict) or message.get("type") != "resize":
        raise InvalidArgument('unknown control message; want {"type": "resize", "rows": R, "cols": C}')
    return PtySize(message.get("rows"), message.get("cols"))  # type: ignore[arg-type]  # checked there


def _error_message(exc: TartarusError) -> str:
    body: dict[str, Any] = {"type": "error", "code": exc.code, "message": exc.message}
    if isinstance(exc, GuestError):
        body["errno"] = exc.errno
    return json.dumps(body)


async def bridge(websocket: WebSocket, process: Process) -> Exit | None:
    """Relay an accepted socket and a PTY process until one ends; returns the exit, or None if the
    client left first (the caller kills the process then)."""

    async def from_client() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is not None:
                await process.write_stdin(data)
                continue
            try:
                size = parse_control(message.get("text") or "")
            except InvalidArgument as e:  # tell the client, keep the session
                await websocket.send_text(_error_message(e))
                continue
            await process.resize(size.rows, size.cols)

    async def to_client() -> Exit:
        while True:
            event = await process.next_event()
            if isinstance(event, Exit):
                return event
            await websocket.send_bytes(event.data)

    reader = asyncio.create_task(from_client(), name="pty-from-client")
    writer = asyncio.create_task(to_client(), name="pty-to-client")
    try:
        done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        if writer in done:
            try:
                exit_ = writer.result()  # raises what failed the process (the sandbox died...)
            except _GONE:
                return None  # the client left while output was on its way
            body = {"type": "exit", "exit_code": exit_.exit_code, "signal": exit_.signal}
            with contextlib.suppress(*_GONE):
                await websocket.send_text(json.dumps(body))
                await websocket.close(CLOSE_NORMAL)
            return exit_
        reader.result()  # the client went away (or sending to the guest failed: raise that)
        return None
    except _GONE:
        return None
    except TartarusError as e:
        log.warning("terminal session ended: %s", e.message)
        with contextlib.suppress(*_GONE):
            await websocket.send_text(_error_message(e))
            await websocket.close(CLOSE_INTERNAL, e.message[:120])
        return None
    finally:
        for task in (reader, writer):
            task.cancel()
        for task in (reader, writer):
            with contextlib.suppress(BaseException):
                await task


async def end(websocket: WebSocket, process: Process) -> None:
    """After the session: kill the command if it still runs, and make sure the socket is closed."""
    if process.exit is None:
        with contextlib.suppress(Exception):
            await process.signal(signal.SIGKILL)
        process.abandon()
    if websocket.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(Exception):
            await websocket.close(CLOSE_NORMAL)
