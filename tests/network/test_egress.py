"""Egress policies with real packets: none, allow, full, and what no policy ever reaches."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tartarus.sdk import Sandbox
from tests.network.conftest import (
    HOST_ADDR,
    ROOT_ADDR,
    Listener,
    NetHost,
    leftovers,
    probe,
    refused_packets,
    uplinks,
    wait_for,
)

pytestmark = pytest.mark.vm


def test_none_reaches_nothing(net_daemon: tuple[str, Path], net_host: NetHost) -> None:
    url, _ = net_daemon
    p1, p2 = net_host.ports
    seen = net_host.listener.connections(p1), net_host.listener.connections(p2)
    with Sandbox.create("python-ds", url=url) as sb:
        assert sb.info.network == "none"
        before = refused_packets(sb.id)
        result = probe(sb, [(HOST_ADDR, p1), (HOST_ADDR, p2)])
        assert result == {(HOST_ADDR, p1): "TimeoutError", (HOST_ADDR, p2): "TimeoutError"}
        assert refused_packets(sb.id) > before  # dropped by the namespace's rules, not lost elsewhere
    assert (net_host.listener.connections(p1), net_host.listener.connections(p2)) == seen


def test_allow_reaches_exactly_its_host_and_port(net_daemon: tuple[str, Path], net_host: NetHost) -> None:
    url, _ = net_daemon
    p1, p2 = net_host.ports
    seen, seen2 = net_host.listener.connections(p1), net_host.listener.connections(p2)
    policy = {"mode": "allow", "allow": [{"host": HOST_ADDR, "ports": [p1]}]}
    with Sandbox.create("python-ds", url=url, network=policy) as sb:
        assert sb.info.network == "allow"
        result = probe(sb, [(HOST_ADDR, p1), (HOST_ADDR, p2), (ROOT_ADDR, p1)])
        assert result[(HOST_ADDR, p1)] == "open"
        assert result[(HOST_ADDR, p2)] == "TimeoutError"
        assert result[(ROOT_ADDR, p1)] == "TimeoutError"
    assert net_host.listener.connections(p1) == seen + 1
    assert net_host.listener.connections(p2) == seen2


def test_full_reaches_out_but_never_host_metadata_or_neighbours(
    net_daemon: tuple[str, Path], net_host: NetHost
) -> None:
    url, _ = net_daemon
    p1, _ = net_host.ports
    host_port = 18090
    host_service = Listener.start([host_port])  # a service of the host itself, on every address
    try:
        with (
            Sandbox.create("python-ds", url=url, network="full") as sb,
            Sandbox.create("python-ds", url=url, network="full") as neighbour,
        ):
            (neighbour_link,) = _uplink_of(neighbour.id)
            gw_of_neighbour = _addresses(neighbour_link)
            own_gw = _addresses(next(iter(_uplink_of(sb.id))))
            host_addrs = _host_addresses()
            targets = [(HOST_ADDR, p1), ("169.254.169.254", 80), ("127.0.0.1", host_port)]
            targets += [(a, host_port) for a in host_addrs + own_gw + gw_of_neighbour]
            # The neighbour's namespace end of its uplink (gateway + 1).
            targets += [(_next(a), 8000) for a in gw_of_neighbour]
            before = refused_packets(sb.id)
            result = probe(sb, targets)
            assert result.pop((HOST_ADDR, p1)) == "open"  # full egress works...
            assert result.pop(("169.254.169.254", 80)) == "TimeoutError"  # ...but not to metadata
            assert result.pop(("127.0.0.1", host_port)) == "refused"  # the guest's own loopback
            assert set(result.values()) == {"TimeoutError"}, result  # host and neighbour: dropped
            assert refused_packets(sb.id) > before
    finally:
        host_service.stop()
    assert host_service.connections(host_port) == 0


def _uplink_of(sandbox_id: str) -> set[str]:
    out = subprocess.run(
        ["ip", "-n", f"tartarus-{sandbox_id}", "-o", "link", "show", "up0"], capture_output=True, text=True
    ).stdout
    index = out.split("@if", 1)[1].split(":", 1)[0]  # the peer's ifindex in the root namespace
    for line in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines():
        number, name = line.split(":", 2)[:2]
        if number == index:
            return {name.strip().split("@")[0]}
    raise AssertionError(f"no root-namespace end for {sandbox_id}")


def _addresses(link: str) -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", link], capture_output=True, text=True)
    return [line.split()[3].split("/")[0] for line in out.stdout.splitlines()]


def _next(address: str) -> str:
    a, b, c, d = map(int, address.split("."))
    return f"{a}.{b}.{c}.{d + 1}"


def _host_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    addrs = [line.split()[3].split("/")[0] for line in out.splitlines()]
    return [a for a in addrs if not a.startswith(("127.", "198.19."))]


def test_destroy_leaves_no_namespace_link_rule_or_cgroup(net_daemon: tuple[str, Path]) -> None:
    url, _ = net_daemon
    sb = Sandbox.create("python-ds", url=url, network="full", timeout=600)
    sandbox_id = sb.id
    (link,) = _uplink_of(sandbox_id)
    assert "netns" in leftovers(sandbox_id)
    assert any(p.is_dir() for p in Path("/sys/fs/cgroup").glob(f"*/tartarus/{sandbox_id}"))
    sb.kill()
    assert leftovers(sandbox_id) == []
    assert link not in uplinks()


def test_allowed_names_are_pinned_in_the_guest(net_daemon: tuple[str, Path]) -> None:
    """The guest has no resolver: a name the policy allows is in its /etc/hosts, as the host resolved it."""
    url, _ = net_daemon
    policy = {"mode": "allow", "allow": [{"host": "localhost", "ports": [9]}]}
    with Sandbox.create("python-ds", url=url, network=policy) as sb:
        hosts = sb.files.read("/etc/hosts").decode()
    assert "# pinned by the sandbox's network policy\n127.0.0.1 localhost\n" in hosts


def test_exposed_port_reaches_the_guest_until_quarantine_or_destroy(net_daemon: tuple[str, Path]) -> None:
    url, _ = net_daemon
    with Sandbox.create("python-ds", url=url) as sb:  # network none: inbound exposure only
        sb.files.make_dir("/tmp/www")
        sb.files.write("/tmp/www/index.html", b"hello from the guest")
        server = sb.run_code(
            "import subprocess\n"
            "_srv = subprocess.Popen(['python3', '-m', 'http.server', '8000', '--directory', '/tmp/www'],"
            " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)"
        )
        assert server.error is None
        address = sb.get_host(8000)
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1"
        assert sb.get_host(8000) == address  # one forward per port
        deadline = time.monotonic() + 30
        while True:
            try:
                body = urllib.request.urlopen(f"http://{address}/index.html", timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "the guest's server never answered"
                time.sleep(0.2)  # the server in the guest is starting under TCG
        assert body == b"hello from the guest"
        assert probe(sb, [(HOST_ADDR, 18080)]) == {(HOST_ADDR, 18080): "TimeoutError"}  # still no egress
        sb.quarantine("test")
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{address}/index.html", timeout=2).read()
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2).close()


ECHO_SERVER = """
import socket, threading
_echo_l = socket.socket()
_echo_l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
_echo_l.bind(("0.0.0.0", 7000))
_echo_l.listen()
def _echo(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
def _serve():
    while True:
        threading.Thread(target=_echo, args=(_echo_l.accept()[0],), daemon=True).start()
threading.Thread(target=_serve, daemon=True).start()
"""


def _echoed(conn: socket.socket, data: bytes) -> bytes:
    conn.sendall(data)
    got = b""
    while len(got) < len(data) and (chunk := conn.recv(len(data) - len(got))):
        got += chunk
    return got


def test_exposed_connections_keep_a_sandbox_awake_and_wake_it(net_daemon: tuple[str, Path]) -> None:
    """A connection through an exposed port counts as a call: it keeps the sandbox from idling into
    hibernation while it lasts, and one to a hibernated sandbox wakes it."""
    url, _ = net_daemon
    with Sandbox.create("python-ds", url=url, idle_timeout=1) as sb:
        assert sb.run_code(ECHO_SERVER).error is None
        host, port = sb.get_host(7000).rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            assert _echoed(conn, b"ping") == b"ping"
            time.sleep(3.5)  # the idle period under test: three idle checks with no API call
            assert sb.refresh().state == "running"
            assert _echoed(conn, b"pong") == b"pong"
        assert wait_for(lambda: sb.refresh().state == "hibernated", 15), "it never idled"
        with socket.create_connection((host, int(port)), timeout=60) as conn:
            assert _echoed(conn, b"again") == b"again"  # the same server, woken with its memory
            assert sb.refresh().state == "running"
