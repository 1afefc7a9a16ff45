"""`full` sandboxes resolve names through the relay at their gateway; `allow` ones get no resolver."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartarus.sdk import Sandbox
from tests.network.conftest import HOST_ADDR, NetHost

pytestmark = pytest.mark.vm

RESOLVE = """
import socket
try:
    _r = socket.getaddrinfo({name!r}, {port}, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    socket.create_connection((_r, {port}), timeout=3).close()
except OSError as e:
    _r = type(e).__name__
_r
"""


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A one-name DNS server on loopback (svc.tartarus.test → the test host), used as the upstream."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    asked: list[str] = []

    def serve() -> None:
        while True:
            try:
                query, addr = sock.recvfrom(4096)
            except OSError:
                return
            labels, i = [], 12
            while query[i]:
                labels.append(query[i + 1 : i + 1 + query[i]].decode())
                i += 1 + query[i]
            question = query[12 : i + 5]
            name = ".".join(labels)
            asked.append(name)
            found = name == "svc.tartarus.test" and query[i + 1 : i + 3] == b"\x00\x01"
            header = query[:2] + struct.pack(">HHHHH", 0x8180 if found else 0x8183, 1, int(found), 0, 0)
            answer = (
                struct.pack(">HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(HOST_ADDR) if found else b""
            )
            sock.sendto(header + question + answer, addr)

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setenv("TARTARUS_DNS", f"127.0.0.1:{sock.getsockname()[1]}")
    yield asked
    sock.close()


def test_full_resolves_through_the_relay(
    net_daemon: tuple[str, Path], net_host: NetHost, upstream: list[str]
) -> None:
    url, _ = net_daemon
    port = net_host.ports[0]
    with Sandbox.create("python-ds", url=url, network="full") as sb:
        assert sb.files.read("/etc/resolv.conf") == b"nameserver 198.18.0.1\n"
        result = sb.run_code(RESOLVE.format(name="svc.tartarus.test", port=port), timeout=60)
        assert result.result == repr(HOST_ADDR)  # resolved by our upstream, then reached
        sb.quarantine("dns test")
        result = sb.run_code(RESOLVE.format(name="svc.tartarus.test", port=port), timeout=60)
        assert result.result == "'gaierror'"  # the gate cuts the relay too
    assert "svc.tartarus.test" in upstream


def test_allow_gets_no_resolver(net_daemon: tuple[str, Path], net_host: NetHost, upstream: list[str]) -> None:
    url, _ = net_daemon
    port = net_host.ports[0]
    policy = {"mode": "allow", "allow": [{"host": HOST_ADDR, "ports": [port]}]}
    with Sandbox.create("python-ds", url=url, network=policy) as sb:
        sb.files.write("/etc/resolv.conf", b"nameserver 198.18.0.1\n")  # even if the guest asks
        result = sb.run_code(RESOLVE.format(name="svc.tartarus.test", port=port), timeout=60)
        assert result.result == "'gaierror'"
    assert upstream == []
