"""TTL timers: one per sandbox with a lifetime, firing a callback (the manager destroys and records)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Deadlines:
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}  # still waiting
        self._firing: set[asyncio.Task[None]] = set()  # expiring now: never cut short

    def schedule(self, key: str, seconds: float, expire: Callable[[], Awaitable[None]]) -> None:
        self.cancel(key)

        async def wait_then_expire() -> None:
            await asyncio.sleep(seconds)  # the timer itself: nothing to poll
            self._tasks.pop(key, None)
            task = asyncio.current_task()
            assert task is not None
            self._firing.add(task)
            try:
                await expire()
            except Exception:
                log.exception("expiring %s failed", key)
            finally:
                self._firing.discard(task)

        self._tasks[key] = asyncio.create_task(wait_then_expire(), name=f"ttl-{key}")

    def cancel(self, key: str) -> None:
        task = self._tasks.pop(key, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def cancel_all(self) -> None:
        for key in list(self._tasks):
            self.cancel(key)

    async def close(self) -> None:
        """Cancel the timers still waiting and wait for those already expiring a sandbox: one cut
        short (the event loop's shutdown cancels what is left) would leave half a sandbox behind."""
        self.cancel_all()
        while self._firing:
            await asyncio.gather(*self._firing, return_exceptions=True)
