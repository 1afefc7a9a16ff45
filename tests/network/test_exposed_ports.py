"""Exposed ports against real sandboxes: the traffic token (403 without it, and no wake), the bounds on
ports per sandbox and per tenant, and on connections in progress."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tartarus.daemon.config import DaemonConfig
from tartarus.daemon.server import daemon_thread
from tartarus.errors import NotFound, QuotaExceeded
from tartarus.network.traffic import E2B_TOKEN_HEADER, TOKEN_HEADER
from tartarus.policy import Policy
from tartarus.policy.model import NetworkRules
from tartarus.sdk import Sandbox

pytestmark = pytest.mark.vm

SERVE = "setsid python3 -m http.server 8000 --directory /tmp/www >/dev/null 2>&1 < /dev/null &"
CONNECTIONS = 4


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A daemon of its own with small bounds, so that reaching them takes few sandboxes."""
    state = tmp_path_factory.mktemp("ports-state")
    rules = NetworkRules(
        max_exposed_ports_per_sandbox=2,
        max_exposed_ports_per_tenant=3,
        max_exposed_connections_per_sandbox=CONNECTIONS,
    )
    with daemon_thread(state, state / "api.sock", DaemonConfig(pool_size=0, policy=Policy(network=rules))):
        yield f"unix://{state / 'api.sock'}"


def _serving(sb: Sandbox, text: bytes) -> None:
    sb.files.make_dir("/tmp/www")
    sb.files.write("/tmp/www/secret.txt", text)
    sb.commands.run(SERVE)


def _get(address: str, headers: dict[str, str] | None = None, timeout: float = 60) -> httpx.Response:
    """GET /secret.txt through the exposed address (the guest's server may still be starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(f"http://{address}/secret.txt", headers=headers, timeout=10)
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"nothing answered on {address}"
            time.sleep(0.2)  # the server in the guest is starting under TCG


def test_a_secure_port_answers_403_without_the_token_and_never_wakes_the_sandbox(url: str) -> None:
    with Sandbox.create("python-ds", url=url) as sb:
        _serving(sb, b"the guest's secret")
        exposed = sb.expose(8000, secure=True)
        token = exposed.traffic_token
        assert token and sb.traffic_token == token
        address = f"{exposed.host}:{exposed.host_port}"
        assert exposed.host == "127.0.0.1"
        ok = _get(address, {TOKEN_HEADER: token})
        assert (ok.status_code, ok.content) == (200, b"the guest's secret")
        assert _get(address, {E2B_TOKEN_HEADER: token}).content == b"the guest's secret"
        for headers in ({}, {TOKEN_HEADER: token[:-1]}, {"Authorization": f"Bearer {token}"}):
            refused = _get(address, headers)
            assert refused.status_code == 403, headers
            assert refused.json()["error"]["code"] == "forbidden"
            assert b"the guest's secret" not in refused.content
        assert sb.expose(8000).traffic_token == token  # asked again without secure: still protected

        assert sb.hibernate().state == "hibernated"
        assert _get(address).status_code == 403
        socket.create_connection(("127.0.0.1", exposed.host_port), timeout=10).close()
        assert sb.refresh().state == "hibernated"  # neither woke it
        assert _get(address, {TOKEN_HEADER: token}).content == b"the guest's secret"  # this one does
        assert sb.refresh().state == "running"


def test_exposed_ports_are_capped_per_sandbox_and_per_tenant_and_creates_still_work(url: str) -> None:
    with Sandbox.create("python-ds", url=url) as a, Sandbox.create("python-ds", url=url) as b:
        a.get_host(7001)
        a.get_host(7002)
        assert a.get_host(7002)  # the same port again takes no new place
        for port in range(7003, 7043):  # a flood of requests leaves no listener behind
            with pytest.raises(QuotaExceeded, match="max_exposed_ports_per_sandbox=2"):
                a.get_host(port)
        b.get_host(7001)
        with pytest.raises(QuotaExceeded, match="max_exposed_ports_per_tenant=3"):
            b.get_host(7002)
        a.unexpose(7001)
        with pytest.raises(NotFound):
            a.unexpose(7001)
        assert b.get_host(7002)  # the place a freed
        with Sandbox.create("python-ds", url=url) as c:
            assert c.commands.run("echo still served").stdout == "still served\n"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))  # the daemon runs in this process


# Listening when run_code returns, so that no connection through the port is needed to wait for it (a
# finished one gives its slot back a moment later, which would blur the count below).
SERVE_NOW = """
import functools, http.server, threading
class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass
_srv = http.server.ThreadingHTTPServer(("0.0.0.0", 8000), functools.partial(_Quiet, directory="/tmp/www"))
threading.Thread(target=_srv.serve_forever, daemon=True).start()
"""


def test_a_connection_flood_is_closed_at_once_and_the_held_ones_keep_working(url: str) -> None:
    with Sandbox.create("python-ds", url=url) as sb:
        sb.files.make_dir("/tmp/www")
        sb.files.write("/tmp/www/secret.txt", b"still here")
        assert sb.run_code(SERVE_NOW).error is None
        host, port = sb.get_host(8000).rsplit(":", 1)
        held = [socket.create_connection((host, int(port)), timeout=30) for _ in range(CONNECTIONS)]
        for conn in held:
            conn.sendall(b"GET /secret.txt HTTP/1.0\r\n")  # a request begun, not ended: the slot is held
        before = _open_fds()
        flood = [socket.create_connection((host, int(port)), timeout=30) for _ in range(40)]
        for conn in flood:
            assert conn.recv(1) == b"", "a connection past the bound was forwarded"
        assert _open_fds() - before <= len(flood) + 8  # this side's sockets; none kept by the daemon
        for conn in flood:
            conn.close()
        for conn in held:
            conn.sendall(b"\r\n")
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
            conn.close()
            assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"still here")
        assert _get(f"{host}:{port}").content == b"still here"  # slots given back
