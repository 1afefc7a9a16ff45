"""Exposed ports: listeners kept across restarts, the traffic-token gate in front of the guest, and the
bounds on ports and connections. The guest here is a server on the host's loopback, reached through
this process's own namespace (the forwarder does not care which namespace it connects from)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from tartarus.daemon.ports import ExposedPorts, Exposure, Rules, load_exposed
from tartarus.errors import QuotaExceeded
from tartarus.network.expose import PortForward
from tartarus.network.traffic import E2B_TOKEN_HEADER, TOKEN_HEADER

OWN_NETNS = Path("/proc/self/ns/net")


@contextlib.asynccontextmanager
async def _nowhere(sandbox_id: str) -> AsyncIterator[Path]:
    raise AssertionError("no connection reaches a sandbox in this test")
    yield Path("/nonexistent")


async def _keeps_and_moves() -> int:
    ports = ExposedPorts(_nowhere)
    port = (await ports.listen("sb-a", 8000, tenant="t")).host_port
    again = await ports.listen("sb-a", 8000, tenant="t")
    assert (again.host, again.host_port) == ("127.0.0.1", port)  # one listener per guest port
    await ports.close("sb-a")
    assert ports.of("sb-a") == {}
    await ports.listen_again("sb-a", {8000: (port, None)}, "t")
    assert ports.of("sb-a")[8000].host_port == port
    await ports.listen_again("sb-b", {8000: (port, None)}, "t")  # taken by sb-a: another one
    moved = ports.of("sb-b")[8000].host_port
    assert moved not in (0, port)
    await ports.close_all()
    return port


def test_a_forward_keeps_its_port_when_free_and_moves_when_taken() -> None:
    port = asyncio.run(_keeps_and_moves())
    with socket.socket() as s:  # and the port is free again once closed
        s.bind(("127.0.0.1", port))


class Guest:
    """An HTTP server standing in for the guest's: records each connection's bytes, answers one 200."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.readuntil(b"\r\n\r\n")
        self.received.append(data)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nguest")
        await w.drain()
        w.close()

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def _ask(port: int, head: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(head)
    await w.drain()
    async with asyncio.timeout(10):
        answer = await r.read()
    w.close()
    return answer


def _counting_target(entered: list[int]) -> Callable[[], contextlib.AbstractAsyncContextManager[Path]]:
    @contextlib.asynccontextmanager
    async def target() -> AsyncIterator[Path]:
        entered.append(1)  # where the daemon would wake the sandbox
        yield OWN_NETNS

    return target


def _run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


TOKEN = "tt_secret-token"


def test_a_protected_port_refuses_without_the_token_before_reaching_or_waking_the_guest() -> None:
    async def test() -> None:
        guest = Guest()
        entered: list[int] = []
        async with guest as guest_port:
            forward = PortForward(_counting_target(entered), "127.0.0.1", guest_port, token=TOKEN)
            await forward.start()
            port = forward.address[1]
            for head in (
                b"GET /secret HTTP/1.1\r\nHost: x\r\n\r\n",
                f"GET /secret HTTP/1.1\r\n{TOKEN_HEADER}: wrong\r\n\r\n".encode(),
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            ):
                answer = await _ask(port, head)
                assert answer.split(b"\r\n", 1)[0] in (b"HTTP/1.1 403 Forbidden", b"HTTP/1.1 400 Bad Request")
                assert b"guest" not in answer
            assert entered == [] and guest.received == []  # nothing woken, nothing reached
            for name in (TOKEN_HEADER, E2B_TOKEN_HEADER):
                answer = await _ask(port, f"GET /secret HTTP/1.1\r\n{name}: {TOKEN}\r\nA: b\r\n\r\n".encode())
                assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"guest")
            assert len(entered) == 2
            assert guest.received == [b"GET /secret HTTP/1.1\r\nA: b\r\n\r\n"] * 2  # the token stays here
            await forward.close()

    _run(test)


def test_an_open_port_forwards_without_a_token() -> None:
    async def test() -> None:
        guest = Guest()
        async with guest as guest_port:
            forward = PortForward(_counting_target([]), "127.0.0.1", guest_port)
            await forward.start()
            assert (await _ask(forward.address[1], b"GET / HTTP/1.1\r\n\r\n")).endswith(b"guest")
            await forward.close()

    _run(test)


def test_ports_are_bounded_per_sandbox_and_per_tenant() -> None:
    async def test() -> None:
        ports = ExposedPorts(_nowhere, Rules(ports_per_sandbox=2, ports_per_tenant=3))
        await ports.listen("sb-a", 1, tenant="t")
        await ports.listen("sb-a", 2, tenant="t")
        await ports.listen("sb-a", 2, tenant="t")  # asked again: no new port
        with pytest.raises(QuotaExceeded, match="max_exposed_ports_per_sandbox=2"):
            await ports.listen("sb-a", 3, tenant="t")
        await ports.listen("sb-b", 1, tenant="t")
        with pytest.raises(QuotaExceeded, match="max_exposed_ports_per_tenant=3"):
            await ports.listen("sb-b", 2, tenant="t")
        await ports.listen("sb-c", 1, tenant="other")  # another tenant's count is its own
        assert await ports.unlisten("sb-a", 1)
        await ports.listen("sb-b", 2, tenant="t")  # room again
        assert not await ports.unlisten("sb-a", 1)
        await ports.close_all()

    _run(test)


def test_connections_past_the_bounds_are_closed_at_once() -> None:
    """Connections that have not sent their head hold their slots; past the bound, the next is
    closed at once (no slot, no further descriptor); a slot freed lets the next one in."""

    async def test() -> None:
        ports = ExposedPorts(_nowhere, Rules(connections_per_sandbox=2, connections_per_tenant=3))
        a = (await ports.listen("sb-a", 80, tenant="t", protect=True)).host_port
        b = (await ports.listen("sb-b", 80, tenant="t", protect=True)).host_port
        held = [await asyncio.open_connection("127.0.0.1", a) for _ in range(2)]
        held.append(await asyncio.open_connection("127.0.0.1", b))

        async def closed_at_once(port: int) -> bool:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            try:
                async with asyncio.timeout(5):
                    return await r.read() == b""
            except TimeoutError:
                return False
            finally:
                w.close()

        assert await closed_at_once(a)  # the sandbox's bound
        assert await closed_at_once(b)  # the tenant's bound
        r, w = held.pop(0)
        w.write(b"GET / HTTP/1.1\r\n\r\n")  # no token: refused, and its slot is free once it closes
        assert (await r.read()).startswith(b"HTTP/1.1 403")
        w.close()
        async with asyncio.timeout(10):
            while True:  # until the daemon has seen that close (no more than one loop turn or two)
                r, w = await asyncio.open_connection("127.0.0.1", a)
                w.write(b"GET / HTTP/1.1\r\n\r\n")
                answer = await r.read()
                w.close()
                if answer:
                    break
        assert answer.startswith(b"HTTP/1.1 403")  # served by the gate, not closed
        for _, w in held:
            w.close()
        await ports.close_all()

    _run(test)


def test_protection_is_added_never_dropped_and_survives_a_restart() -> None:
    async def test() -> None:
        ports = ExposedPorts(_nowhere)
        open_ = await ports.listen("sb-a", 80, tenant="t")
        assert open_.token is None
        protected = await ports.listen("sb-a", 80, tenant="t", protect=True)
        assert protected.host_port == open_.host_port and protected.token
        assert (await ports.listen("sb-a", 80, tenant="t")).token == protected.token
        other = await ports.listen("sb-a", 81, tenant="t", protect=True)
        assert other.token == protected.token  # one token per sandbox
        required = ExposedPorts(_nowhere, Rules(require_token=True))
        assert (await required.listen("sb-a", 80, tenant="t")).token  # the policy's requirement
        await required.close_all()
        await ports.listen("sb-a", 82, tenant="t")
        written = ports.written("sb-a")
        await ports.close_all()
        again = ExposedPorts(_nowhere)
        await again.listen_again("sb-a", load_exposed(written), "t")
        restored = {g: Exposure(g, "127.0.0.1", h, t) for g, (h, t) in load_exposed(written).items()}
        assert again.of("sb-a") == restored and restored[80].token == protected.token
        assert restored[82].token is None
        assert again.token("sb-a") == protected.token
        await again.close_all()

    _run(test)


def test_exposed_ports_read_back_as_written_old_and_new() -> None:
    assert load_exposed({"8000": 41234, "22": 40001}) == {8000: (41234, None), 22: (40001, None)}
    assert load_exposed({"80": {"host_port": 4, "token": "tt_x"}}) == {80: (4, "tt_x")}
    assert load_exposed(None) == {}  # a record from before ports were written down


def test_a_refused_request_with_a_body_still_gets_its_403() -> None:
    """Closing with the body unread would reset the connection before the client read the answer."""

    async def test() -> None:
        forward = PortForward(_counting_target([]), "127.0.0.1", 9, token=TOKEN)
        await forward.start()
        r, w = await asyncio.open_connection("127.0.0.1", forward.address[1])
        body = b"x" * (1 << 19)
        w.write(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body))
        async with asyncio.timeout(10):
            answer = await r.readuntil(b"\r\n\r\n")
            w.write(body)  # sent after the refusal came, as a client that did not wait for 100 would
            await w.drain()
            w.write_eof()
            rest = await r.read()
        assert answer.startswith(b"HTTP/1.1 403") and b"forbidden" in rest
        w.close()
        await forward.close()

    _run(test)
