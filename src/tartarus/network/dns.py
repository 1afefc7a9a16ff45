"""DNS for `full` sandboxes: a relay at the guest's gateway (198.18.0.1:53/udp) to the host's resolvers.

The guest gets no resolver under `none` and `allow` (an allow policy's names are pinned by the host),
but `full` egress without DNS is of little use. The relay's guest-facing socket is created inside the
sandbox's namespace; each query is forwarded from the daemon (root namespace) to the resolvers of the
host's /etc/resolv.conf — which may be private or loopback addresses a `full` guest may not reach
itself — or to TARTARUS_DNS (`host[:port],...`). Answers are relayed as they are: a name that resolves
to a denied address is still denied by the namespace's rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import cast

from tartarus.network.libnft import in_netns

log = logging.getLogger(__name__)

PORT = 53
MAX_QUERY = 4096
MAX_PENDING = 64  # queries in flight per sandbox; more are dropped (the guest retries)
TIMEOUT_S = 3.0


def upstreams() -> list[tuple[str, int]]:
    """TARTARUS_DNS, else the nameservers of the host's /etc/resolv.conf, else none."""
    env = os.environ.get("TARTARUS_DNS")
    if env:
        result = []
        for item in env.split(","):
            host, _, port = item.strip().rpartition(":") if item.count(":") == 1 else (item.strip(), "", "")
            result.append((host, int(port or PORT)))
        return result
    servers = []
    with contextlib.suppress(OSError):
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver" and ":" not in parts[1]:
                servers.append((parts[1], PORT))
    return servers


async def _ask(query: bytes, upstream: tuple[str, int]) -> bytes | None:
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
            if not answer.done() and data[:2] == query[:2]:
                answer.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=upstream)
    try:
        transport.sendto(query)
        async with asyncio.timeout(TIMEOUT_S):
            return await answer
    except TimeoutError:
        return None
    finally:
        transport.close()


class _Relay(asyncio.DatagramProtocol):
    def __init__(self, servers: list[tuple[str, int]]) -> None:
        self.servers = servers
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        if len(data) < 12 or len(data) > MAX_QUERY or len(self.pending) >= MAX_PENDING:
            return
        task = asyncio.ensure_future(self._relay(data, addr))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _relay(self, query: bytes, addr: tuple[str | object, int]) -> None:
        for server in self.servers:
            try:
                answer = await _ask(query, server)
            except OSError:
                continue
            if answer is not None:
                if self.transport is not None:
                    self.transport.sendto(answer, addr)
                return


class DnsRelay:
    def __init__(self, netns: Path, address: str) -> None:
        self.netns = netns
        self.address = address
        self._transport: asyncio.DatagramTransport | None = None
        self._relay: _Relay | None = None

    async def start(self) -> None:
        def bind() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((self.address, PORT))
            return sock

        sock = await asyncio.wrap_future(in_netns(self.netns, bind))
        loop = asyncio.get_running_loop()
        relay = _Relay(upstreams())
        transport, _ = await loop.create_datagram_endpoint(lambda: relay, sock=sock)
        self._transport, self._relay = transport, relay

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._relay is not None:
            for task in list(self._relay.pending):
                task.cancel()
            self._relay = None
