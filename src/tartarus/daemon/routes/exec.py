"""Running commands in a sandbox, their events streamed (Python's warm interpreter: routes/code.py)."""

from __future__ import annotations

import base64
import contextlib
import signal
from collections.abc import AsyncGenerator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tartarus.daemon.models import ExecEvent, ExecRequest
from tartarus.daemon.routes.deps import ERRORS, stream_hold
from tartarus.errors import GuestError, InvalidArgument, TartarusError
from tartarus.runtime.agent import Exit, Output, Process, PtySize

router = APIRouter()


@router.post(
    "/v1/sandboxes/{sandbox_id}/exec",
    responses={200: {"content": {"application/x-ndjson": {}, "text/event-stream": {}}}, **ERRORS},
    response_class=StreamingResponse,
)
async def exec_command(sandbox_id: str, body: ExecRequest, request: Request) -> StreamingResponse:
    """Run a command, streaming ExecEvents as NDJSON, or as server-sent events with
    `Accept: text/event-stream` (event name = the event's type)."""
    sse = "text/event-stream" in request.headers.get("accept", "")
    stdin = None
    if body.stdin is not None:
        try:
            stdin = base64.b64decode(body.stdin, validate=True)
        except ValueError as e:  # binascii.Error, or characters that are not ASCII at all
            raise InvalidArgument(f"stdin is not valid base64: {e}") from e
    async with stream_hold(request, sandbox_id) as hold:
        rt = hold.sandbox
        process = await rt.agent.exec(
            body.argv,
            env={**rt.env, **body.env},
            # Another user may not be able to enter the template's workdir: let the agent use "/".
            cwd=body.cwd or (None if body.user else rt.template.workdir),
            user=body.user,
            timeout=body.timeout,
            stdin=stdin is not None,
            pty=PtySize(body.pty.rows, body.pty.cols) if body.pty else None,
        )
        media_type = "text/event-stream" if sse else "application/x-ndjson"
        return hold.respond(
            events(process, stdin, sse=sse), media_type=media_type, headers={"Cache-Control": "no-cache"}
        )


async def events(
    process: Process, stdin: bytes | None = None, *, sse: bool = False
) -> AsyncGenerator[bytes, None]:
    """A command's events as NDJSON lines (or server-sent events). Ending early (the client left, the
    stream failed) kills the command, unless it is kept (a background command: it runs on, its output
    dropped until someone attaches)."""

    def line(event: ExecEvent) -> bytes:
        data = event.model_dump_json(exclude_none=True).encode()
        return b"event: " + event.type.encode() + b"\ndata: " + data + b"\n\n" if sse else data + b"\n"

    yield line(ExecEvent(type="started", pid=process.pid))
    try:
        if stdin is not None:
            await process.write_stdin(stdin)
            await process.close_stdin()
        async for event in process.events():
            if isinstance(event, Output):
                yield line(ExecEvent(type=event.stream, data=base64.b64encode(event.data).decode()))
            elif isinstance(event, Exit):
                yield line(
                    ExecEvent(
                        type="exit", exit_code=event.exit_code, signal=event.signal, timed_out=event.timed_out
                    )
                )
    except TartarusError as e:
        errno_ = e.errno if isinstance(e, GuestError) else None
        yield line(ExecEvent(type="error", code=e.code, message=e.message, errno=errno_))
    finally:
        if process.exit is None:
            if not process.keep:
                with contextlib.suppress(Exception):
                    await process.signal(signal.SIGKILL)
            process.abandon()
