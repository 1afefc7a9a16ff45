"""Exposed ports listen again on the host port they had if it is free, and on another if not."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

from tartarus.daemon.ports import ExposedPorts


@contextlib.asynccontextmanager
async def _nowhere(sandbox_id: str) -> AsyncIterator[Path]:
    raise AssertionError("no connection is made in this test")
    yield Path("/nonexistent")


async def _keeps_and_moves() -> int:
    ports = ExposedPorts(_nowhere)
    _, port = await ports.listen("sb-a", 8000)
    assert await ports.listen("sb-a", 8000) == ("127.0.0.1", port)  # one listener per guest port
    await ports.close("sb-a")
    assert ports.of("sb-a") == {}
    await ports.listen_again("sb-a", {8000: port})
    assert ports.of("sb-a") == {8000: port}
    await ports.listen_again("sb-b", {8000: port})  # taken by sb-a: another one
    moved = ports.of("sb-b")[8000]
    assert moved not in (0, port)
    await ports.close_all()
    return port


def test_a_forward_keeps_its_port_when_free_and_moves_when_taken() -> None:
    port = asyncio.run(_keeps_and_moves())
    with socket.socket() as s:  # and the port is free again once closed
        s.bind(("127.0.0.1", port))
