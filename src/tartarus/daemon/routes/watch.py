"""Watching a directory in a sandbox: its changes, named, streamed as newline-delimited JSON.

The guest agent passes inotify masks on (docs/protocol.md, "Watches"); they are named here the way
E2B's envd (and Go's fsnotify, which it uses) names them, so the E2B layer maps them one to one. The
stream holds the sandbox (no idle hibernation while someone watches it); a guest making changes
faster than the client reads them costs bounded memory: the agent drops what its credit does not
cover and says so with an `overflow` event.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncGenerator
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from tartarus.daemon.routes.deps import ERRORS, stream_hold
from tartarus.daemon.routes.files import PathQuery
from tartarus.errors import GuestError, TartarusError
from tartarus.runtime.agent import Watch

router = APIRouter()

WatchType = Literal["started", "create", "write", "remove", "rename", "chmod", "overflow", "error"]
IN_ISDIR = 0x40000000
# inotify's bits, in the order a mask is named by (one change has one of them; IN_ISDIR qualifies it).
_NAMES: tuple[tuple[int, WatchType], ...] = (
    (0x4000, "overflow"),  # IN_Q_OVERFLOW: events were dropped
    (0x100 | 0x80, "create"),  # IN_CREATE, IN_MOVED_TO
    (0x2, "write"),  # IN_MODIFY
    (0x200 | 0x400, "remove"),  # IN_DELETE, IN_DELETE_SELF
    (0x40 | 0x800, "rename"),  # IN_MOVED_FROM, IN_MOVE_SELF
    (0x4, "chmod"),  # IN_ATTRIB
)


# A file written through the API is written to a temporary file in its directory, then renamed over it
# (the guest agent's WRITE): clients see the file created and written under its own name, as if written
# in place, and nothing of the temporary file.
_AGENT_TEMP = re.compile(r"(^|/)\.tartarus-write-[A-Za-z0-9]{6}$")
IN_MOVED_FROM, IN_MOVED_TO = 0x40, 0x80


class Shown:
    """The guest's changes as a client sees them, one watch's worth (it remembers the last change: a
    rename's two halves arrive one after the other)."""

    def __init__(self) -> None:
        self._temp_moved = False  # the last change moved the agent's temporary file away

    def __call__(self, mask: int, name: str) -> list[tuple[WatchType, str]]:
        kind = event_type(mask)
        temp = _AGENT_TEMP.search(name) is not None
        written = self._temp_moved and bool(mask & IN_MOVED_TO)
        self._temp_moved = temp and bool(mask & IN_MOVED_FROM)
        if kind is None or temp:
            return []
        return [("create", name), ("write", name)] if written else [(kind, name)]


class WatchEvent(BaseModel):
    """One line of the watch stream: `started` first, then a line per change."""

    type: WatchType
    name: str | None = Field(None, description="the path below the watched directory ('' for itself)")
    is_dir: bool | None = None
    code: str | None = None
    message: str | None = None
    errno: int | None = None


def event_type(mask: int) -> WatchType | None:
    """The name of a change the guest reported by its inotify mask; None: not a change to report."""
    for bits, name in _NAMES:
        if mask & bits:
            return name
    return None


async def _events(watch: Watch) -> AsyncGenerator[bytes, None]:
    def line(event: WatchEvent) -> bytes:
        return event.model_dump_json(exclude_none=True).encode() + b"\n"

    yield line(WatchEvent(type="started"))
    shown = Shown()
    try:
        while (event := await watch.next_event()) is not None:
            for kind, name in shown(event.mask, event.name):
                yield line(WatchEvent(type=kind, name=name, is_dir=bool(event.mask & IN_ISDIR)))
    except TartarusError as e:
        errno_ = e.errno if isinstance(e, GuestError) else None
        yield line(WatchEvent(type="error", code=e.code, message=e.message, errno=errno_))
    finally:
        with contextlib.suppress(Exception):
            watch.close()


@router.get(
    "/v1/sandboxes/{sandbox_id}/files/watch",
    responses={200: {"content": {"application/x-ndjson": {}}}, **ERRORS},
    response_class=StreamingResponse,
)
async def watch_dir(
    sandbox_id: str,
    path: PathQuery,
    request: Request,
    recursive: Annotated[
        bool, Query(description="also the directories below it, made later ones too")
    ] = False,
) -> StreamingResponse:
    """Follow a directory's changes as NDJSON WatchEvents (`started`, then `create`, `write`,
    `remove`, `rename`, `chmod`, or `overflow` when events were lost) until the client closes the
    stream or the directory goes away. At most 16 watches per sandbox (422, errno 24, EMFILE)."""
    async with stream_hold(request, sandbox_id) as hold:
        watch = await hold.sandbox.agent.watch(path, recursive=recursive)
        return hold.respond(
            _events(watch), media_type="application/x-ndjson", headers={"Cache-Control": "no-cache"}
        )
