"""envd's directory watches: the stream (WatchDir) and the polled kind (CreateWatcher, then
GetWatcherEvents until RemoveWatcher), over /v1's watch stream.

A polled watcher is a task following the /v1 stream into a bounded queue: a client that creates
watchers and never polls them holds at most MAX_WATCHERS per sandbox of MAX_QUEUED events each; events
past that are dropped and an EVENT_TYPE_UNSPECIFIED event with an empty name marks where (the SDK skips
it; a change was lost there, as when the guest's own queue overflows).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from tartarus.e2b.connect import ConnectError
from tartarus.e2b.upstream import UpstreamError, WatchChange

MAX_WATCHERS = 8  # polled watchers per sandbox (the guest agent allows 16 watches of any kind)
MAX_QUEUED = 4096  # events a polled watcher keeps until it is polled
EVENT_TYPES = {
    "create": "EVENT_TYPE_CREATE",
    "write": "EVENT_TYPE_WRITE",
    "remove": "EVENT_TYPE_REMOVE",
    "rename": "EVENT_TYPE_RENAME",
    "chmod": "EVENT_TYPE_CHMOD",
    "overflow": "EVENT_TYPE_UNSPECIFIED",
}


def fs_event(change: WatchChange) -> dict[str, Any] | None:
    """A /v1 change as envd's FilesystemEvent (None: not a change: `started`, `error`)."""
    kind = EVENT_TYPES.get(change.type)
    return None if kind is None else {"name": change.name, "type": kind}


def watch_error(change: WatchChange) -> ConnectError | None:
    """A /v1 `error` line as the Connect error that ends the watch."""
    if change.type != "error":
        return None
    return ConnectError(
        "unavailable" if change.code == "sandbox_failed" else "internal", change.message or ""
    )


@dataclass
class Watcher:
    sandbox_id: str
    changes: AsyncGenerator[WatchChange, None]
    queue: deque[dict[str, Any]] = field(default_factory=deque)
    lost: bool = False
    error: ConnectError | None = None
    task: asyncio.Task[None] | None = None

    def keep(self, event: dict[str, Any]) -> None:
        if len(self.queue) >= MAX_QUEUED:
            self.lost = True
            return
        if self.lost:
            self.lost = False
            self.queue.append({"name": "", "type": "EVENT_TYPE_UNSPECIFIED"})
        self.queue.append(event)

    async def follow(self) -> None:
        try:
            async for change in self.changes:
                if (error := watch_error(change)) is not None:
                    self.error = error
                    return
                if (event := fs_event(change)) is not None:
                    self.keep(event)
        except UpstreamError as e:
            self.error = ConnectError("unavailable", f"the watch ended: {e.message}")
        except Exception as e:  # the daemon went away: the next poll says so
            self.error = ConnectError("unavailable", f"the watch ended: {e}")
        finally:
            await self.changes.aclose()

    def take(self) -> list[dict[str, Any]]:
        taken = list(self.queue)
        self.queue.clear()
        if self.lost:
            self.lost = False
            taken.append({"name": "", "type": "EVENT_TYPE_UNSPECIFIED"})
        return taken


class Watchers:
    """The polled watchers of every sandbox this E2B endpoint serves, by id."""

    def __init__(self) -> None:
        self._by_id: dict[str, Watcher] = {}

    async def create(self, sandbox_id: str, changes: AsyncGenerator[WatchChange, None]) -> str:
        """Start following `changes` (whose `started` line is still to come: an error before it is
        raised here); returns the watcher's id."""
        if sum(w.sandbox_id == sandbox_id for w in self._by_id.values()) >= MAX_WATCHERS:
            await changes.aclose()
            raise ConnectError("resource_exhausted", f"at most {MAX_WATCHERS} watchers per sandbox")
        try:
            first = await anext(changes)
        except BaseException:
            await changes.aclose()
            raise
        if first.type != "started":
            await changes.aclose()
            raise watch_error(first) or ConnectError("internal", f"the watch began with {first.type}")
        watcher = Watcher(sandbox_id, changes)
        watcher.task = asyncio.create_task(watcher.follow(), name=f"e2b-watcher-{sandbox_id}")
        watcher_id = secrets.token_urlsafe(12)
        self._by_id[watcher_id] = watcher
        return watcher_id

    def _get(self, sandbox_id: str, watcher_id: str) -> Watcher:
        watcher = self._by_id.get(watcher_id)
        if watcher is None or watcher.sandbox_id != sandbox_id:
            raise ConnectError("not_found", f"watcher {watcher_id!r} not found")
        return watcher

    def events(self, sandbox_id: str, watcher_id: str) -> list[dict[str, Any]]:
        """The events since the last poll; a watch that ended answers its error (once, then it is gone)."""
        watcher = self._get(sandbox_id, watcher_id)
        taken = watcher.take()
        if not taken and watcher.error is not None:
            del self._by_id[watcher_id]
            raise watcher.error
        return taken

    async def remove(self, sandbox_id: str, watcher_id: str) -> None:
        watcher = self._get(sandbox_id, watcher_id)
        del self._by_id[watcher_id]
        await _stop(watcher)

    async def close(self) -> None:
        """Stop every watcher (the endpoint is shutting down)."""
        watchers, self._by_id = list(self._by_id.values()), {}
        for watcher in watchers:
            await _stop(watcher)


async def _stop(watcher: Watcher) -> None:
    if watcher.task is not None:
        watcher.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher.task
