"""Runtime trigger: a sandbox that scans ports is quarantined by the refused-packets counter."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartarus import audit
from tartarus.daemon.config import DaemonConfig
from tartarus.daemon.server import daemon_thread
from tartarus.policy.model import Policy, QuarantineSettings
from tartarus.sdk import Sandbox
from tests.network.conftest import HOST_ADDR, NetHost, probe

pytestmark = pytest.mark.vm

SCAN = """
import socket, concurrent.futures as cf
def _try(port):
    try:
        socket.create_connection(({host!r}, port), timeout=0.3).close()
    except OSError:
        pass
with cf.ThreadPoolExecutor(32) as _pool:
    list(_pool.map(_try, range(1000, 1400)))
"""


@pytest.fixture(scope="module")
def trigger_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    policy = Policy(quarantine=QuarantineSettings(refused_packets=150, window_s=3))
    state = tmp_path_factory.mktemp("trigger-state")
    uds = state / "api.sock"
    with daemon_thread(state, uds, DaemonConfig(pool_size=0, policy=policy)):
        yield f"unix://{uds}", state


def test_port_scan_is_quarantined(trigger_daemon: tuple[str, Path], net_host: NetHost) -> None:
    url, state = trigger_daemon
    port = net_host.ports[0]
    policy = {"mode": "allow", "allow": [{"host": HOST_ADDR, "ports": [port]}]}
    with Sandbox.create("python-ds", url=url, network=policy) as sb:
        assert probe(sb, [(HOST_ADDR, port)]) == {(HOST_ADDR, port): "open"}  # a few refusals are fine
        assert not sb.refresh().quarantined
        assert sb.run_code(SCAN.format(host=HOST_ADDR), timeout=120).error is None
        deadline = time.monotonic() + 10
        while not sb.refresh().quarantined:
            assert time.monotonic() < deadline, "the scan was not noticed"
            time.sleep(0.1)  # polling the daemon's trigger through the API
        assert "refused by its network policy" in (sb.info.quarantine_reason or "")
        assert probe(sb, [(HOST_ADDR, port)]) == {(HOST_ADDR, port): "TimeoutError"}
        sandbox_id = sb.id
    records = [r for r in audit.read(state) if r.get("sandbox") == sandbox_id]
    assert records[0]["action"] == "sandbox.quarantine"
    assert records[0]["by"] == "trigger:refused-packets"
