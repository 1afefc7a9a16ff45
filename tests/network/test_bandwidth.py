"""Network bandwidth on real VMs and gVisor sandboxes: the policy's egress and ingress rates hold for
transfers between the guest and a namespace this test creates, measured against what the same run
reaches unthrottled.

Egress is timed on the receiving side (the test host's listener: first connection to last byte, host
clock); ingress in the guest, from its first byte to the end of the stream.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tartarus.daemon.config import DaemonConfig
from tartarus.daemon.server import daemon_thread
from tartarus.policy.model import BandwidthPolicy, Policy
from tartarus.sdk import Sandbox
from tests.gvisor.helpers import require_gvisor
from tests.network.conftest import HOST_ADDR, NetHost, wait_for

pytestmark = pytest.mark.vm

MIB = 1 << 20
TOLERANCE = 1.2  # measured / configured
SOURCE_PORT = 18090

SEND = """
import socket
_s = socket.create_connection(({host!r}, {port}), timeout=60)
_s.sendall(b"x" * {n})
_s.shutdown(socket.SHUT_WR)
_s.recv(1)  # the listener closes once it has read everything
_s.close()
"""

RECEIVE = """
import socket, time
_s = socket.create_connection(({host!r}, {port}), timeout=60)
_s.sendall(b"{n}\\n")
_got, _first = 0, None
while True:
    _chunk = _s.recv(1 << 16)
    if not _chunk:
        break
    _first = _first or time.monotonic()
    _got += len(_chunk)
_s.close()
(_got, time.monotonic() - _first)
"""

# In the test host's namespace: a connection that asks for n bytes (a line) gets them as fast as the
# path takes them.
SOURCE = r"""
import socket, sys, threading
port = int(sys.argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(8)
print("ready", flush=True)
def serve(c):
    with c:
        c.sendall(b"y" * int(c.makefile("rb").readline()))
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""


@dataclass(frozen=True)
class Rates:
    egress: float
    ingress: float


def egress_rate(sb: Sandbox, net_host: NetHost, nbytes: int) -> float:
    port = net_host.ports[1]
    seen = len(net_host.listener.lines)
    result = sb.run_code(SEND.format(host=HOST_ADDR, port=port, n=nbytes), timeout=120)
    assert result.error is None, result.error
    assert wait_for(lambda: any(ln.startswith(f"close {port} ") for ln in net_host.listener.lines[seen:]), 10)
    lines = [ln.split() for ln in net_host.listener.lines[seen:]]
    start = next(float(f[3]) for f in lines if f[0] == "conn" and f[1] == str(port))
    data = [(int(f[2]), float(f[3])) for f in lines if f[0] == "data" and f[1] == str(port)]
    assert sum(n for n, _ in data) == nbytes
    return nbytes / (data[-1][1] - start)


def ingress_rate(sb: Sandbox, nbytes: int) -> float:
    result = sb.run_code(RECEIVE.format(host=HOST_ADDR, port=SOURCE_PORT, n=nbytes), timeout=120)
    assert result.error is None and result.result is not None, result.error
    got, seconds = eval(result.result)  # a tuple of two numbers our own snippet produced
    assert got == nbytes
    return float(got / seconds)


@pytest.fixture(scope="module")
def source(net_host: NetHost) -> Iterator[None]:
    """The sending server in the test host's namespace."""
    argv = ["ip", "netns", "exec", net_host.netns, "python3", "-u", "-c", SOURCE, str(SOURCE_PORT)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        yield
    finally:
        process.kill()
        process.wait()


def network_policy(net_host: NetHost) -> dict[str, object]:
    return {"mode": "allow", "allow": [{"host": HOST_ADDR, "ports": [net_host.ports[1], SOURCE_PORT]}]}


@pytest.mark.parametrize("backend", ["vm", "gvisor"])
def test_egress_and_ingress_stay_within_the_policys_rates(
    net_daemon: tuple[str, Path], net_host: NetHost, source: None, tmp_path: Path, backend: str
) -> None:
    """On a VM the rates are tc's on its TAP and uplink; on gVisor on its veth's outer end and uplink."""
    asked: str | None = None
    if backend == "gvisor":
        require_gvisor()
        asked = "gvisor"
    with Sandbox.create(
        "python-ds", url=net_daemon[0], network=network_policy(net_host), backend=asked
    ) as sb:
        unthrottled = Rates(egress_rate(sb, net_host, 16 * MIB), ingress_rate(sb, 16 * MIB))
    rate = int(min(unthrottled.egress, unthrottled.ingress) / 8)
    rate = min(rate, 2 * MIB)
    assert rate >= 256 << 10, f"this machine is too slow to test network limits: {unthrottled}"
    assert min(unthrottled.egress, unthrottled.ingress) >= 8 * rate
    policy = Policy(bandwidth=BandwidthPolicy(egress_bytes_per_s=rate, ingress_bytes_per_s=rate // 2))
    with daemon_thread(tmp_path, tmp_path / "api.sock", DaemonConfig(pool_size=0, policy=policy)):
        url = f"unix://{tmp_path / 'api.sock'}"
        with Sandbox.create("python-ds", url=url, network=network_policy(net_host), backend=asked) as sb:
            assert sb.info.backend == (asked or sb.info.backend)
            assert egress_rate(sb, net_host, int(2.5 * rate)) <= TOLERANCE * rate
            assert ingress_rate(sb, int(2.5 * rate / 2)) <= TOLERANCE * rate / 2
