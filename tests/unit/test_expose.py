"""A forward re-made after a restart or a wake keeps its host port if it can, and takes another if not."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from tartarus.network.expose import PortForward


def test_a_forward_keeps_its_port_when_free_and_moves_when_taken() -> None:
    port = asyncio.run(_keeps_and_moves())
    with socket.socket() as s:  # and the port is free again once closed
        s.bind(("127.0.0.1", port))


async def _keeps_and_moves() -> int:
    first = PortForward(Path("/nonexistent"), "198.18.0.2", 8000)
    await first.start()
    port = first.address[1]
    await first.close()
    again = PortForward(Path("/nonexistent"), "198.18.0.2", 8000)
    await again.start(port)
    assert again.address[1] == port
    try:
        moved = PortForward(Path("/nonexistent"), "198.18.0.2", 8000)
        await moved.start(port)  # taken by `again`
        assert moved.address[1] not in (0, port)
        await moved.close()
    finally:
        await again.close()
    return port
