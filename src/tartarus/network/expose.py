"""Inbound port exposure (`sb.get_host(port)`): a host address that forwards to a port of the guest.

A TCP proxy in the daemon rather than DNAT rules: the listener is on the host (127.0.0.1 unless
TARTARUS_EXPOSE_HOST says otherwise); each accepted connection gets a socket created *inside the
sandbox's namespace* (sockets keep the namespace they were made in), which connects to the guest
through its TAP. So nothing per-sandbox is added to the root namespace's rules, and the guest still
cannot open any connection itself: the namespace only accepts the guest's replies to connections the
namespace opened, and a quarantine's closed gate drops those too. Which namespace a connection goes to
is asked per connection (`target`), so a listener outlives its sandbox's VMM: a hibernated sandbox is
woken by a connection, as by any other call.

A port with a traffic token (`tartarus.network.traffic`) reads each connection's first HTTP request head
and checks the token *before* it asks for the target, so a connection without it reaches nothing and
wakes nothing. Each connection takes a slot first (`slot`: the daemon's per-sandbox and per-tenant
bounds); one that gets none is closed at once, so a flood of connections cannot use up the daemon's
file descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tartarus.network import traffic
from tartarus.network.libnft import in_netns

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
CHUNK = 1 << 16
LINGER_S, LINGER_BYTES = 2.0, 1 << 20  # after a refusal: how long, and how much, the client is heard


def expose_host() -> str:
    return os.environ.get("TARTARUS_EXPOSE_HOST", "127.0.0.1")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


# Per connection: the namespace to connect from, held (the sandbox kept running) while the connection lasts.
Target = Callable[[], contextlib.AbstractAsyncContextManager[Path]]
# Per connection, before anything else: a function that gives the slot back, or None when none is free.
Slot = Callable[[], Callable[[], None] | None]


def _unbounded() -> Callable[[], None]:
    return lambda: None


async def _read_head(reader: asyncio.StreamReader) -> tuple[traffic.RequestHead, bytes]:
    """The first request head and whatever came after it; BadHead if it is not one, or too large."""
    buffer = b""
    while (length := traffic.head_length(buffer)) is None:
        chunk = await reader.read(traffic.MAX_HEAD + 4 - len(buffer))
        if not chunk:
            raise traffic.BadHead(400, "the connection closed before its request head")
        buffer += chunk
    return traffic.parse_head(buffer[:length]), buffer[length:]


async def _gate(token: str, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> bytes | None:
    """The bytes to send the guest first (the head without its token), or None: the client was answered
    with a refusal and nothing may reach the guest."""
    try:
        async with asyncio.timeout(traffic.HEAD_TIMEOUT_S):
            head, rest = await _read_head(client_r)
    except TimeoutError:
        status, message = 408, "no request head in time"
    except traffic.BadHead as e:
        status, message = e.status, e.message
    else:
        if traffic.token_ok(head, token):
            return head.without_tokens() + rest
        status, message = 403, traffic.FORBIDDEN
    with contextlib.suppress(ConnectionError, OSError, TimeoutError):
        client_w.write(traffic.refusal(status, message))
        await client_w.drain()
        # Read what the client still sends (a body) for a moment: closing with unread data would
        # reset the connection, and the client might lose the answer.
        if client_w.can_write_eof():
            client_w.write_eof()
        async with asyncio.timeout(LINGER_S):
            drained = 0
            while drained < LINGER_BYTES and (chunk := await client_r.read(CHUNK)):
                drained += len(chunk)
    return None


@dataclass
class PortForward:
    target: Target
    guest_addr: str
    guest_port: int
    token: str | None = None  # the traffic token each connection must present (None: open port)
    slot: Slot = _unbounded
    server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self, host_port: int = 0) -> None:
        """Listen on `host_port` if given (the address a client was handed before a daemon restart), on
        a free port if it is 0 or someone else has taken it meanwhile."""
        if host_port:
            try:
                self.server = await asyncio.start_server(self._accept, expose_host(), host_port)
                return
            except OSError as e:
                log.warning(
                    "port %d for guest port %d is taken (%s): using another", host_port, self.guest_port, e
                )
        self.server = await asyncio.start_server(self._accept, expose_host(), 0)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        give_back = self.slot()
        if give_back is None:  # over its bounds: refused before it costs more than this socket
            client_w.close()
            return
        self._tasks.add(task)
        guest_w: asyncio.StreamWriter | None = None
        try:
            first = b""
            if self.token is not None:
                gated = await _gate(self.token, client_r, client_w)
                if gated is None:
                    return
                first = gated
            async with self.target() as netns:
                sock = await asyncio.wrap_future(in_netns(netns, socket.socket))
                sock.setblocking(False)
                loop = asyncio.get_running_loop()
                try:
                    async with asyncio.timeout(CONNECT_TIMEOUT_S):
                        await loop.sock_connect(sock, (self.guest_addr, self.guest_port))
                except (OSError, TimeoutError):
                    sock.close()
                    return
                guest_r, guest_w = await asyncio.open_connection(sock=sock)
                if first:
                    guest_w.write(first)
                await asyncio.gather(_pipe(client_r, guest_w), _pipe(guest_r, client_w))
        except Exception as e:  # the sandbox could not be woken, has ended, is quarantined: refused
            log.info("connection to guest port %d refused: %s", self.guest_port, e)
        except asyncio.CancelledError:
            # cut(): this connection's task ends here. Nobody awaits it, and 3.11's start_server logs a
            # cancelled handler as "Exception in callback".
            pass
        finally:
            for w in (client_w, guest_w):
                if w is not None:
                    w.close()
            self._tasks.discard(task)
            give_back()

    def cut(self) -> None:
        """End every connection in progress; the listener stays."""
        for task in list(self._tasks):
            task.cancel()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.cut()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
            self.server = None
