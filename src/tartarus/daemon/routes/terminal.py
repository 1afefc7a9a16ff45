"""Interactive terminals: a WebSocket bridged to a command on a pseudo-terminal in the guest."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, WebSocket

from tartarus.daemon import terminal
from tartarus.daemon.routes.deps import stream_hold
from tartarus.errors import GuestError
from tartarus.runtime.agent import PtySize
from tartarus.runtime.protocol import PTY_MAX_SIZE

router = APIRouter()


@router.websocket("/v1/sandboxes/{sandbox_id}/pty")
async def pty_session(
    websocket: WebSocket,
    sandbox_id: str,
    argv: Annotated[list[str], Query(max_length=4096)] = [],  # noqa: B006
    rows: Annotated[int, Query(ge=1, le=PTY_MAX_SIZE)] = 24,
    cols: Annotated[int, Query(ge=1, le=PTY_MAX_SIZE)] = 80,
    env: Annotated[list[str], Query(max_length=4096)] = [],  # noqa: B006
    cwd: Annotated[str | None, Query(pattern=r"^/", max_length=4095)] = None,
    user: Annotated[str | None, Query(pattern=r"^[a-z_][a-z0-9_-]*\$?$", max_length=32)] = None,
) -> None:
    """An interactive terminal (docs/control-plane.md): `argv` (default: bash, else sh) on a
    pseudo-terminal; the command is killed when the socket closes. Refusals (auth, unknown
    sandbox, a command that cannot start) are HTTP error responses to the handshake."""
    variables = terminal.parse_env(env)
    async with stream_hold(websocket, sandbox_id) as hold:  # the whole session: no idle hibernation
        rt = hold.sandbox
        if not argv:
            try:
                await rt.agent.stat("/bin/bash")
                argv = ["/bin/bash"]
            except GuestError:
                argv = ["/bin/sh"]
        websocket.state.audit_detail = {"argv": argv, "rows": rows, "cols": cols}
        process = await rt.agent.exec(
            argv,
            env={**rt.env, **variables},
            cwd=cwd or (None if user else rt.template.workdir),
            user=user,
            pty=PtySize(rows, cols),
        )
        try:
            await websocket.accept()
            await terminal.bridge(websocket, process)
        finally:
            await terminal.end(websocket, process)
