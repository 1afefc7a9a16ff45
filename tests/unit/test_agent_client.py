"""The host agent client against a hostile peer on a socketpair: it fails the sandbox, never the host."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tartarus.errors import SandboxFailed
from tartarus.runtime.agent import AgentClient
from tartarus.runtime.protocol import HEADER, MAX_PAYLOAD, F, T, encode, encode_fields


async def _client() -> tuple[AgentClient, socket.socket]:
    host, guest = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=host)
    guest.setblocking(False)
    return AgentClient(reader, writer), guest


@pytest.mark.parametrize(
    "garbage",
    [
        HEADER.pack(MAX_PAYLOAD + 1, 1, T.OK, 0, 0),  # oversized
        HEADER.pack(4, 1, 0x7F, 0, 0) + b"abcd",  # unknown type
        encode(T.OK, 1, b"\x10\x00\x00\x00\x08\x00"),  # integer field cut short
    ],
)
def test_garbage_fails_pending_requests_cleanly(garbage: bytes) -> None:
    async def main() -> str:
        client, guest = await _client()
        ping = asyncio.create_task(client.ping())
        await asyncio.sleep(0)
        await asyncio.get_running_loop().sock_sendall(guest, garbage)
        with pytest.raises(SandboxFailed) as e:
            await asyncio.wait_for(ping, 5)
        with pytest.raises(SandboxFailed):  # and every later call fails fast
            await client.ping()
        await client.close()
        guest.close()
        return e.value.message

    assert "broke the protocol" in asyncio.run(main())


def test_guest_closing_the_channel_fails_requests() -> None:
    async def main() -> None:
        client, guest = await _client()
        ping = asyncio.create_task(client.ping())
        await asyncio.sleep(0)
        guest.close()
        with pytest.raises(SandboxFailed, match="channel"):
            await asyncio.wait_for(ping, 5)
        await client.close()

    asyncio.run(main())


def test_replies_are_routed_by_request_id() -> None:
    async def main() -> tuple[int, int]:
        client, guest = await _client()
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(client.ping())
        second = asyncio.create_task(client.ping())
        await asyncio.sleep(0.01)
        # Answer in reverse order with different versions: each caller must get its own answer.
        await loop.sock_sendall(guest, encode(T.OK, 2, encode_fields([(F.VERSION, 22)])))
        await loop.sock_sendall(guest, encode(T.OK, 1, encode_fields([(F.VERSION, 11)])))
        result = (await first, await second)
        await client.close()
        guest.close()
        return result

    assert asyncio.run(main()) == (11, 22)
