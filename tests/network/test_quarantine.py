"""Quarantine: live (a connection that keeps sending is cut at once), at admission, and its audit."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartarus import audit
from tartarus.daemon.config import DaemonConfig
from tartarus.daemon.server import daemon_thread
from tartarus.errors import Conflict, PolicyDenied
from tartarus.policy.model import Match, Policy, Rule
from tartarus.sdk import Sandbox
from tests.network.conftest import HOST_ADDR, NetHost, probe, sh, wait_for

pytestmark = pytest.mark.vm

SENDER = """
import socket, threading, time
_sent = [0]
def _send():
    s = socket.create_connection(({host!r}, {port}), timeout=10)
    while True:
        s.send(b"x")
        _sent[0] += 1
        time.sleep(0.002)
threading.Thread(target=_send, daemon=True).start()
"""


def cpu_quota_us(sandbox_id: str) -> int:
    """The CFS quota of a sandbox's VMM cgroup (per 100 ms period), v1 or v2."""
    v1 = Path(f"/sys/fs/cgroup/cpu/tartarus/{sandbox_id}/cpu.cfs_quota_us")
    if v1.exists():
        return int(v1.read_text())
    return int(Path(f"/sys/fs/cgroup/tartarus/{sandbox_id}/cpu.max").read_text().split()[0])


def delivered(net_host: NetHost, port: int) -> int:
    """Bytes the destination's kernel has received on `port` (tcp_info bytes_received, summed over its
    connections): what got through, whenever the listener process gets round to reading it."""
    out = sh("ip", "netns", "exec", net_host.netns, "ss", "-tinH", "state", "established", f"sport = :{port}")
    return sum(int(m) for m in re.findall(r"bytes_received:(\d+)", out))


def sends(sb: Sandbox) -> int:
    """How many chunks the guest's sender has handed to its socket so far."""
    return int(sb.run_code("_sent[0]").result or "0")


def start_sender(sb: Sandbox, port: int) -> None:
    """A thread of the guest's interpreter that keeps sending a byte every 2 ms."""
    result = sb.run_code(SENDER.format(host=HOST_ADDR, port=port))
    assert result.error is None, result.error


def test_live_quarantine_cuts_a_sending_connection_at_once(
    net_daemon: tuple[str, Path], net_host: NetHost
) -> None:
    url, state = net_daemon
    port = net_host.ports[0]
    listener = net_host.listener
    policy = {"mode": "allow", "allow": [{"host": HOST_ADDR, "ports": [port]}]}
    with Sandbox.create("python-ds", url=url, network=policy) as sb:
        start = time.time()
        start_sender(sb, port)
        assert wait_for(lambda: len([t for t in listener.data_times(port) if t > start]) > 20, 30)
        assert cpu_quota_us(sb.id) == 100_000  # one vCPU: one CPU
        flowing = delivered(net_host, port)
        assert wait_for(lambda: delivered(net_host, port) > flowing, 30), "not sending before the call"
        info = sb.quarantine("test: live cut")
        assert cpu_quota_us(sb.id) == 10_000  # clamped to the policy's cpu_fraction (0.1)
        memory = Path(f"/sys/fs/cgroup/memory/tartarus/{sb.id}")
        if memory.exists():  # v1: growth stops at max(current use, 256 MiB), and waits rather than dies
            assert "oom_kill_disable 1" in (memory / "memory.oom_control").read_text()
            limit = int((memory / "memory.limit_in_bytes").read_text())
            assert limit < (512 + 320) << 20
            assert limit >= int((memory / "memory.usage_in_bytes").read_text())
        assert info.quarantined and info.network == "none"
        assert info.quarantine_reason == "test: live cut"
        # Correctness by event order, not a timer: what had reached the destination when the call
        # returned, then the guest sends 100 more chunks, none of which may arrive. (How fast the cut
        # bites is `tartarus bench quarantine`'s live_quarantine_ms.)
        cut = delivered(net_host, port)
        after_cut = sends(sb)
        assert wait_for(lambda: sends(sb) > after_cut + 100, 60), "the guest stopped sending"
        assert delivered(net_host, port) == cut, "bytes reached the destination after quarantine returned"
        # Still running (no restart), still answering its owner, still cut off.
        assert sb.run_code("1+1").result == "2"
        assert probe(sb, [(HOST_ADDR, port)]) == {(HOST_ADDR, port): "TimeoutError"}
        with pytest.raises(Conflict):
            sb.quarantine("again")
        info = sb.release()
        assert not info.quarantined and info.network == "allow"
        assert cpu_quota_us(sb.id) == 100_000
        if memory.exists():
            assert int((memory / "memory.limit_in_bytes").read_text()) == (512 + 320) << 20
            assert "oom_kill_disable 0" in (memory / "memory.oom_control").read_text()
        assert probe(sb, [(HOST_ADDR, port)]) == {(HOST_ADDR, port): "open"}
        sandbox_id = sb.id
    actions = [(r["action"], r.get("by")) for r in audit.read(state) if r.get("sandbox") == sandbox_id]
    calls = [r for r in audit.read(state) if r.get("target") == sandbox_id and "quarantine" in r["action"]]
    by = f"operator:{calls[0]['actor']}@local"  # the key the SDK used: the local admin key
    assert actions == [("sandbox.quarantine", by), ("sandbox.release", by)]


@pytest.fixture(scope="module")
def policy_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    policy = Policy(
        rules=[
            Rule(
                name="no-crypto", match=Match(labels={"job": "miner"}), verdict="reject", reason="no miners"
            ),
            Rule(
                name="risky", match=Match(labels={"risk": "high"}), verdict="quarantine", reason="high risk"
            ),
        ]
    )
    state = tmp_path_factory.mktemp("policy-state")
    uds = state / "api.sock"
    with daemon_thread(state, uds, DaemonConfig(pool_size=0, policy=policy)):
        yield f"unix://{uds}", state


def test_admission_verdicts(policy_daemon: tuple[str, Path], net_host: NetHost) -> None:
    url, state = policy_daemon
    port = net_host.ports[0]
    with pytest.raises(PolicyDenied, match="no miners"):
        Sandbox.create("python-ds", url=url, labels={"job": "miner"})
    # The last sandbox event (the API also records each call, as "POST /v1/sandboxes").
    assert [r for r in audit.read(state) if r["action"].startswith("sandbox.")][-1]["action"] == (
        "sandbox.rejected"
    )
    policy = {"mode": "allow", "allow": [{"host": HOST_ADDR, "ports": [port]}]}
    with Sandbox.create("python-ds", url=url, network=policy, labels={"risk": "high"}) as sb:
        assert sb.info.quarantined and sb.info.quarantine_reason == "high risk"
        assert sb.info.network == "none"
        assert probe(sb, [(HOST_ADDR, port)]) == {(HOST_ADDR, port): "TimeoutError"}
        assert sb.release().network == "allow"  # what it asked for, only after an operator release
        assert probe(sb, [(HOST_ADDR, port)]) == {(HOST_ADDR, port): "open"}
        sandbox_id = sb.id
    records = [r for r in audit.read(state) if r.get("sandbox") == sandbox_id]
    assert [r["action"] for r in records] == ["sandbox.quarantine", "sandbox.release"]
    assert records[0]["by"] == "admission:risky"
