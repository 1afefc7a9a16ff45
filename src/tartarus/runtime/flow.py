"""Per-request inboxes of the agent client: bounded in bytes, never blocking the channel's reader.

The guest may send a streamed request's output only against credit (docs/protocol.md, "Flow control"):
`WINDOW` bytes at the start, and what the host's consumer has drained since, returned in `CREDIT` frames.
An honest guest therefore never has more than a window queued here; a guest that sends beyond it (hostile,
or an agent too old for flow control) hits the inbox's byte bound and that request fails instead of the
host buffering on, or the one reader that serves every request waiting for a slow consumer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from tartarus.errors import SandboxFailed
from tartarus.runtime.protocol import CREDITED_TYPES, Frame

WINDOW = 2 << 20  # output bytes a stream may have unacknowledged (its initial credit); 1 MiB cost reads ~10%
FRAME_COST = 256  # window bytes a data frame costs beyond its payload (the host's bookkeeping per frame)
REFILL = WINDOW // 4  # drained bytes returned to the guest in one CREDIT (fewer frames on the channel)
# What one inbox may hold: a window of output, another for a stream taken over from an earlier client
# (`AgentClient.adopt`: the guest's unknown leftover credit plus a fresh window), and its few control frames.
STREAM_BUFFER = 2 * WINDOW + (64 << 10)
MAX_STREAMS = 64  # concurrent streams (commands, file reads) per sandbox
# Every inbox of a sandbox together: all its streams with a full window, and room for short requests.
SANDBOX_BUFFER = MAX_STREAMS * WINDOW + (16 << 20)


def cost(frame: Frame) -> int:
    """Bytes a queued frame is counted as; a data frame's cost is also what it takes from the window."""
    return len(frame.payload) + FRAME_COST


class Budget:
    """Bytes queued in all the inboxes of one sandbox."""

    def __init__(self, limit: int = SANDBOX_BUFFER) -> None:
        self.limit = limit
        self.queued = 0


class Inbox:
    """Frames for one request that its caller has not taken yet.

    `put` never waits: a frame over the inbox's or the sandbox's bound fails the request (its frames are
    dropped at once, freeing their memory) and the caller learns why on its next `get`. `grant` returns
    drained output to the guest as credit."""

    def __init__(self, budget: Budget, grant: Callable[[int], None]) -> None:
        self._budget = budget
        self._grant = grant
        self._items: deque[Frame | BaseException] = deque()
        self._ready = asyncio.Event()
        self._drained = 0  # output cost taken by the caller and not yet returned as credit
        self.queued = 0
        self.failed = False

    def put(self, frame: Frame) -> bool:
        """Queue `frame`; False if it would break a bound (the caller then fails the request)."""
        if self.failed:
            return True  # the request already failed: what still arrives for it is dropped
        size = cost(frame)
        if self.queued + size > STREAM_BUFFER or self._budget.queued + size > self._budget.limit:
            return False
        self._items.append(frame)
        self.queued += size
        self._budget.queued += size
        self._ready.set()
        return True

    def fail(self, error: BaseException) -> None:
        """End the request with `error`: drop what it has queued and refuse what comes after."""
        if self.failed:
            return
        self.close()
        self._items.append(error)
        self.failed = True
        self._ready.set()

    def close(self) -> None:
        """Give back the memory of whatever is still queued (the request ended or was abandoned)."""
        self._items.clear()
        self._budget.queued -= self.queued
        self.queued = 0

    def empty(self) -> bool:
        return not self._items

    def overrun(self, frame: Frame) -> SandboxFailed:
        return SandboxFailed(
            f"guest agent overran request {frame.id}: {self.queued} bytes queued, a {cost(frame)}-byte "
            f"{frame.type.name} frame would pass the {STREAM_BUFFER}-byte bound for one stream or the "
            f"{self._budget.limit}-byte bound for the sandbox (the guest ignored its flow-control window)"
        )

    async def get(self) -> Frame:
        """The next frame, or raise what failed the request. Safe to cancel: no frame is lost."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self._items.append(item)  # every later call hears it too
            raise item
        size = cost(item)
        self.queued -= size
        self._budget.queued -= size
        if item.type in CREDITED_TYPES:
            self._drained += size
            if self._drained >= REFILL:
                self._grant(self._drained)
                self._drained = 0
        return item
