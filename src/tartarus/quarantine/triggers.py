"""Runtime triggers: quarantine a sandbox for what it does, not only for what it asked for.

The refused-packets trigger watches each sandbox namespace's `refused` nft counter (every packet from
the guest that its policy dropped). Normal code makes a few refused attempts (a retrying client, a
probe for a proxy); a port scan or a flood makes hundreds. Above `refused_packets` within
`window_s`, the sandbox is quarantined with the count as its reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from tartarus.errors import TartarusError
from tartarus.sandbox.sandbox import Sandbox

log = logging.getLogger(__name__)

POLL_S = 0.5

Quarantine = Callable[[str, str, str], Awaitable[object]]  # (sandbox id, reason, by)


class RefusedPacketsTrigger:
    def __init__(self, threshold: int, window_s: float, quarantine: Quarantine) -> None:
        self.threshold = threshold
        self.window_s = window_s
        self._quarantine = quarantine
        self._history: dict[str, collections.deque[tuple[float, int]]] = {}

    async def check(self, sandboxes: Iterable[Sandbox]) -> list[str]:
        """One pass: sample every sandbox's counter; quarantine those over the threshold."""
        now = time.monotonic()
        fired = []
        seen = set()
        for sb in sandboxes:
            if sb.network is None or sb.quarantined is not None:
                continue
            seen.add(sb.id)
            try:
                count = sb.network.refused()
            except TartarusError:
                continue  # its namespace is being torn down
            history = self._history.setdefault(sb.id, collections.deque())
            history.append((now, count))
            while history and history[0][0] < now - self.window_s:
                history.popleft()
            refused = count - history[0][1]
            if refused >= self.threshold:
                reason = f"{refused} packets refused by its network policy within {self.window_s:g} s"
                with contextlib.suppress(TartarusError):
                    await self._quarantine(sb.id, reason, "trigger:refused-packets")
                    fired.append(sb.id)
                    log.warning("sandbox %s quarantined: %s", sb.id, reason)
                self._history.pop(sb.id, None)
        for gone in set(self._history) - seen:
            del self._history[gone]
        return fired

    async def run(self, sandboxes: Callable[[], Iterable[Sandbox]]) -> None:
        while True:
            try:
                await self.check(sandboxes())
            except Exception:
                log.exception("refused-packets trigger pass failed")
            await asyncio.sleep(POLL_S)  # the sampling period
