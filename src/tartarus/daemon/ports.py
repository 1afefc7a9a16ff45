"""The daemon's exposed guest ports, per sandbox: listeners that last as long as the sandbox does.

They belong to the daemon, not to a sandbox's network, because a sandbox's network and VMM come and go
(hibernation) while the addresses its clients hold should not: a connection to a hibernated sandbox's
port wakes it. The guest port -> host port map is written down (descriptor, hibernation record) so a
restarted daemon listens again on the same host ports.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from tartarus.network.expose import PortForward
from tartarus.network.sandbox import GUEST_ADDR

log = logging.getLogger(__name__)

GUEST_IP = GUEST_ADDR.split("/")[0]


class ExposedPorts:
    def __init__(self, into: Callable[[str], contextlib.AbstractAsyncContextManager[Path]]) -> None:
        """`into(sandbox_id)`: the sandbox's namespace for one connection, held while it lasts."""
        self._into = into
        self._forwards: dict[str, dict[int, PortForward]] = {}

    async def listen(self, sandbox_id: str, guest_port: int, host_port: int = 0) -> tuple[str, int]:
        """The host address forwarding to `guest_port` (made on first ask; on `host_port` if free)."""
        forwards = self._forwards.setdefault(sandbox_id, {})
        forward = forwards.get(guest_port)
        if forward is None:
            forward = PortForward(lambda: self._into(sandbox_id), GUEST_IP, guest_port)
            await forward.start(host_port)
            forwards[guest_port] = forward
        return forward.address

    async def listen_again(self, sandbox_id: str, ports: dict[int, int]) -> None:
        """Listen again on the host ports a sandbox had (after a daemon restart); one that cannot be
        made is logged, never a reason not to serve the sandbox (its client can ask again)."""
        for guest, host in sorted(ports.items()):
            try:
                await self.listen(sandbox_id, guest, host)
            except OSError as e:
                log.warning("could not expose port %d of %s again: %s", guest, sandbox_id, e)

    def of(self, sandbox_id: str) -> dict[int, int]:
        """Guest port -> host port of a sandbox's forwards."""
        return {guest: f.address[1] for guest, f in self._forwards.get(sandbox_id, {}).items()}

    def cut(self, sandbox_id: str) -> None:
        """End the connections open to a sandbox, keeping its listeners (it is about to hibernate)."""
        for forward in self._forwards.get(sandbox_id, {}).values():
            forward.cut()

    async def close(self, sandbox_id: str) -> None:
        for forward in self._forwards.pop(sandbox_id, {}).values():
            await forward.close()

    async def close_all(self) -> None:
        for sandbox_id in list(self._forwards):
            await self.close(sandbox_id)
