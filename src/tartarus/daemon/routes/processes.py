"""Commands addressed by their guest pid: background commands that outlive the request that started
them, the list of running commands, and input to, signals for and a stream from any of them.

`POST /exec` (routes/exec.py) stays what it was: its command dies when its stream ends. A command
started here is *kept*: its stream may end (the client went away, or only wanted the pid) and it runs
on, its output dropped while nobody listens, until it exits or is signalled; `.../stream` attaches to it
again (output from then on, and its exit). Needs a guest agent of protocol 4 (409 otherwise). A pid
that is not a running command of a client is 422 guest_error with errno 3 (ESRCH), as a missing file
is 422 with errno 2: a 404 names a missing sandbox.
"""

from __future__ import annotations

import base64
import signal

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from tartarus.daemon.models import Strict, TerminalSize
from tartarus.daemon.routes.deps import ERRORS, Manager, stream_hold
from tartarus.daemon.routes.exec import events
from tartarus.errors import InvalidArgument
from tartarus.runtime.agent import GuestProcess, PtySize

router = APIRouter()

MAX_INPUT = 512 << 10  # bytes of stdin in one call: in base64 it fits the 1 MiB JSON body limit (gate.py)
NDJSON = {200: {"content": {"application/x-ndjson": {}}}, **ERRORS}


class ProcessStart(Strict):
    argv: list[str] = Field(min_length=1, max_length=4096, examples=[["python3", "-m", "http.server"]])
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = Field(None, pattern=r"^/")
    user: str | None = Field(None, pattern=r"^[a-z_][a-z0-9_-]*\$?$", max_length=32)
    timeout: float | None = Field(None, gt=0, le=86400, description="seconds; the command is killed after")
    stdin: bool = Field(False, description="keep its stdin open for .../stdin (else it reads /dev/null)")
    pty: TerminalSize | None = Field(
        None,
        description="run it on a pseudo-terminal of this size: output arrives as stdout, stdin is open,"
        " .../resize changes the size",
    )


class ProcessInfo(BaseModel):
    pid: int = Field(description="the command's pid inside the guest")
    argv: list[str] = Field(description="its argv (the agent keeps at most 8 KiB of it)")
    cwd: str | None
    background: bool = Field(description="started here: outlives its stream")
    pty: bool
    stdin: bool = Field(description="its stdin is open")
    attached: bool = Field(description="a stream is following its output")


class ProcessList(BaseModel):
    processes: list[ProcessInfo]


class StdinRequest(Strict):
    data: str = Field("", max_length=(MAX_INPUT * 4) // 3 + 4, description="bytes, base64-encoded")
    close: bool = Field(False, description="close its stdin after the data (on a terminal: type ^D)")


class ResizeRequest(TerminalSize):
    pass


class SignalRequest(Strict):
    signal: int | str = Field(examples=[15, "SIGTERM"], description="a number 1-64 or a name such as SIGKILL")


def _signal_number(value: int | str) -> int:
    if isinstance(value, int):
        if not 1 <= value <= 64:
            raise InvalidArgument(f"signal must be 1-64, not {value}")
        return value
    name = value.upper()
    try:
        return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
    except KeyError:
        raise InvalidArgument(f"unknown signal {value!r}") from None


def _info(p: GuestProcess) -> ProcessInfo:
    return ProcessInfo(
        pid=p.pid,
        argv=list(p.argv),
        cwd=p.cwd,
        background=p.keep,
        pty=p.pty,
        stdin=p.stdin,
        attached=p.attached,
    )


@router.post("/v1/sandboxes/{sandbox_id}/processes", responses=NDJSON, response_class=StreamingResponse)
async def start_process(sandbox_id: str, body: ProcessStart, request: Request) -> StreamingResponse:
    """Start a background command: streams ExecEvents as NDJSON (`started` with its guest pid first),
    and closing the stream leaves it running."""
    async with stream_hold(request, sandbox_id) as hold:
        rt = hold.sandbox
        process = await rt.agent.exec(
            body.argv,
            env={**rt.env, **body.env},
            cwd=body.cwd or (None if body.user else rt.template.workdir),
            user=body.user,
            timeout=body.timeout,
            stdin=body.stdin,
            pty=PtySize(body.pty.rows, body.pty.cols) if body.pty else None,
            keep=True,
        )
        return hold.respond(
            events(process), media_type="application/x-ndjson", headers={"Cache-Control": "no-cache"}
        )


@router.get("/v1/sandboxes/{sandbox_id}/processes", response_model=ProcessList, responses=ERRORS)
async def list_processes(sandbox_id: str, manager: Manager) -> ProcessList:
    """The commands running in the sandbox that clients started (not its interpreter or start command)."""
    async with manager.use(sandbox_id) as rt:
        found = await rt.agent.processes()
    return ProcessList(processes=[_info(p) for p in found])


@router.get(
    "/v1/sandboxes/{sandbox_id}/processes/{pid}/stream", responses=NDJSON, response_class=StreamingResponse
)
async def attach_process(sandbox_id: str, pid: int, request: Request) -> StreamingResponse:
    """Follow a running command: its output from now on and its exit, as NDJSON ExecEvents. One stream
    per command: a stream already following it ends with an `error` event (errno 16, EBUSY)."""
    async with stream_hold(request, sandbox_id) as hold:
        process = await hold.sandbox.agent.attach(pid)
        return hold.respond(
            events(process), media_type="application/x-ndjson", headers={"Cache-Control": "no-cache"}
        )


@router.post("/v1/sandboxes/{sandbox_id}/processes/{pid}/stdin", status_code=204, responses=ERRORS)
async def write_stdin(sandbox_id: str, pid: int, body: StdinRequest, manager: Manager) -> Response:
    """Write to a running command's stdin and/or close it. A closed stdin is 422 (errno 32, EPIPE)."""
    try:
        data = base64.b64decode(body.data, validate=True)
    except ValueError as e:
        raise InvalidArgument(f"data is not valid base64: {e}") from e
    if len(data) > MAX_INPUT:
        raise InvalidArgument(f"at most {MAX_INPUT} bytes of stdin per call")
    async with manager.use(sandbox_id) as rt:
        await rt.agent.send_input(pid, data, close=body.close)
    return Response(status_code=204)


@router.post("/v1/sandboxes/{sandbox_id}/processes/{pid}/signal", status_code=204, responses=ERRORS)
async def signal_process(sandbox_id: str, pid: int, body: SignalRequest, manager: Manager) -> Response:
    """Signal a running command (its process group; on a terminal, its session)."""
    signum = _signal_number(body.signal)
    async with manager.use(sandbox_id) as rt:
        await rt.agent.signal_pid(pid, signum)
    return Response(status_code=204)


@router.post("/v1/sandboxes/{sandbox_id}/processes/{pid}/resize", status_code=204, responses=ERRORS)
async def resize_process(sandbox_id: str, pid: int, body: ResizeRequest, manager: Manager) -> Response:
    """Set the terminal size of a running command started with `pty` (its foreground job gets
    SIGWINCH). A command on no terminal is 422 (errno 25, ENOTTY)."""
    async with manager.use(sandbox_id) as rt:
        await rt.agent.resize_pid(pid, PtySize(body.rows, body.cols))
    return Response(status_code=204)
