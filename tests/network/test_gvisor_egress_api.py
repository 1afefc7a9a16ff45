"""A gVisor sandbox made through the daemon is contained as a VM is, with real packets: default-deny
egress, an `allow` policy reaching exactly its destination, a quarantine verdict at create, the
operator's live cut of a working flow and its release, its memory limit, and nothing left after a
destroy (namespaces, veth, cgroups). The kill -9 path is tests/api/test_backends.py's."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartarus.daemon.config import DaemonConfig
from tartarus.daemon.server import daemon_thread
from tartarus.errors import TartarusError
from tartarus.gvisor.containment import GVISOR
from tartarus.limits.spec import Limits
from tartarus.network.netns import SLOTS_DIR
from tartarus.policy.model import Match, Policy, Rule
from tartarus.sdk import Sandbox
from tests.gvisor.helpers import require_gvisor
from tests.network.conftest import (
    HOST_ADDR,
    ROOT_ADDR,
    NetHost,
    leftovers,
    probe,
    refused_packets,
    sh,
    uplinks,
    wait_for,
)
from tests.network.test_quarantine import cpu_quota_us, delivered, sends, start_sender

pytestmark = pytest.mark.vm

MIB = 1 << 20
RISKY = Rule(name="risky", match=Match(labels={"risk": "high"}), verdict="quarantine", reason="high risk")


@pytest.fixture(scope="module")
def gvisor_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A daemon whose sandboxes run on gVisor unless they ask otherwise."""
    require_gvisor()
    state = tmp_path_factory.mktemp("gvisor-net-state")
    uds = state / "api.sock"
    config = DaemonConfig(pool_size=0, policy=Policy(rules=[RISKY]), backend="gvisor")
    with daemon_thread(state, uds, config):
        yield f"unix://{uds}"


def memory_limit(sandbox_id: str) -> int:
    v1 = Path(f"/sys/fs/cgroup/memory/tartarus/{sandbox_id}/memory.limit_in_bytes")
    path = v1 if v1.exists() else Path(f"/sys/fs/cgroup/tartarus/{sandbox_id}/memory.max")
    return int(path.read_text())


def uplink_of(sandbox_id: str) -> str:
    """The root-namespace end of a running sandbox's uplink (trt<slot>), from its slot's claim."""
    for path in SLOTS_DIR.iterdir():
        if path.read_text().strip() == f"tartarus-{sandbox_id}":
            return f"trt{path.name}"
    raise AssertionError(f"sandbox {sandbox_id} holds no uplink slot")


def gone(sandbox_id: str, uplink: str) -> list[str]:
    """What of the sandbox's network and cgroups is still there: its two namespaces, uplink, cgroups.
    (Its uplink's slot may be another sandbox's by now, on a host other tests share: then its link is.)"""
    found = leftovers(sandbox_id)
    if f"tartarus-{sandbox_id}-nic" in sh("ip", "netns", "list"):
        found.append("nic netns")
    slot = SLOTS_DIR / uplink.removeprefix("trt")
    if uplink in uplinks() and not slot.exists():
        found.append(uplink)
    if slot.exists() and slot.read_text().strip() == f"tartarus-{sandbox_id}":
        found.append(f"slot {slot.name}")
    return found


def test_gvisor_egress_none_then_allow_then_the_live_cut(gvisor_daemon: str, net_host: NetHost) -> None:
    url = gvisor_daemon
    p1, p2 = net_host.ports
    seen1, seen2 = net_host.listener.connections(p1), net_host.listener.connections(p2)
    with Sandbox.create("python-ds", url=url) as sb:
        assert sb.info.backend == "gvisor" and sb.info.network == "none"
        link = uplink_of(sb.id)
        before = refused_packets(sb.id)
        assert probe(sb, [(HOST_ADDR, p1)]) == {(HOST_ADDR, p1): "TimeoutError"}
        assert refused_packets(sb.id) > before  # dropped by the namespace's rules, as a VM's packets are
        denied = sb.id
    assert net_host.listener.connections(p1) == seen1
    assert gone(denied, link) == []

    policy = {"mode": "allow", "allow": [{"host": HOST_ADDR, "ports": [p1]}]}
    with Sandbox.create("python-ds", url=url, network=policy) as sb:
        assert sb.info.backend == "gvisor" and sb.info.network == "allow"
        link = uplink_of(sb.id)
        result = probe(sb, [(HOST_ADDR, p1), (HOST_ADDR, p2), (ROOT_ADDR, p1)])
        assert result == {
            (HOST_ADDR, p1): "open",
            (HOST_ADDR, p2): "TimeoutError",
            (ROOT_ADDR, p1): "TimeoutError",
        }
        assert net_host.listener.connections(p1) == seen1 + 1
        assert net_host.listener.connections(p2) == seen2
        # The operator's live cut of a connection that keeps sending, then its release.
        start = time.time()
        start_sender(sb, p1)
        assert wait_for(lambda: len([t for t in net_host.listener.data_times(p1) if t > start]) > 20, 30)
        assert cpu_quota_us(sb.id) == 100_000  # one vCPU: one CPU
        flowing = delivered(net_host, p1)
        assert wait_for(lambda: delivered(net_host, p1) > flowing, 30), "not sending before the call"
        info = sb.quarantine("test: gvisor live cut")
        assert info.quarantined and info.network == "none"
        assert cpu_quota_us(sb.id) == 10_000  # the cgroup clamped as a VM's is
        cut = delivered(net_host, p1)
        after_cut = sends(sb)
        assert wait_for(lambda: sends(sb) > after_cut + 100, 60), "the guest stopped sending"
        assert delivered(net_host, p1) == cut, "bytes reached the destination after quarantine returned"
        assert sb.run_code("1+1").result == "2"  # still running, still answering its owner
        info = sb.release()
        assert not info.quarantined and info.network == "allow"
        assert cpu_quota_us(sb.id) == 100_000
        assert probe(sb, [(HOST_ADDR, p1)]) == {(HOST_ADDR, p1): "open"}
        allowed = sb.id
    assert gone(allowed, link) == []


def test_a_quarantine_verdict_starts_a_gvisor_sandbox_behind_a_closed_gate(
    gvisor_daemon: str, net_host: NetHost
) -> None:
    p1 = net_host.ports[0]
    seen = net_host.listener.connections(p1)
    policy = {"mode": "allow", "allow": [{"host": HOST_ADDR, "ports": [p1]}]}
    with Sandbox.create("python-ds", url=gvisor_daemon, network=policy, labels={"risk": "high"}) as sb:
        assert sb.info.backend == "gvisor" and sb.info.quarantined
        assert probe(sb, [(HOST_ADDR, p1)]) == {(HOST_ADDR, p1): "TimeoutError"}
        assert sb.run_code("1+1").result == "2"
    assert net_host.listener.connections(p1) == seen


def test_a_gvisor_sandboxs_memory_limit_holds(gvisor_daemon: str) -> None:
    sb = Sandbox.create("python-ds", url=gvisor_daemon, memory_mib=384)
    try:
        link = uplink_of(sb.id)
        limit = GVISOR.memory_limit_mib(Limits(1, 384, 4096, None, None)) * MIB
        assert memory_limit(sb.id) == limit  # the request's memory plus gVisor's own overhead
        assert sb.info.memory_mib == 384  # what the API shows and quotas count is what it was given
        assert sb.commands.run("python3 -c 'b = bytearray(64 << 20); print(1)'").stdout == "1\n"
        with pytest.raises(TartarusError):
            sb.commands.run(f"python3 -c 'b = bytearray({3 * limit // MIB} << 20)'", timeout=60)
        assert wait_for(lambda: sb.refresh().state == "failed", 30)  # the OOM killer, in its cgroup
    finally:
        sb.kill()
    assert gone(sb.id, link) == []


def spares(state: Path, taken: set[str]) -> list[str]:
    """Sandbox directories holding a created container that no create has taken: a pool's spares."""
    root = state / "sandboxes"
    return [d.name for d in root.iterdir() if d.name not in taken and (d / "gvisor" / "sandbox.pid").exists()]


def test_a_gvisor_create_restores_into_a_created_ahead_container_with_its_own_limits_and_egress(
    tmp_path: Path, net_host: NetHost
) -> None:
    require_gvisor()
    p1 = net_host.ports[0]
    uds = tmp_path / "api.sock"
    taken: set[str] = set()
    with daemon_thread(tmp_path, uds, DaemonConfig(pool_size=1, backend="gvisor")):
        url = f"unix://{uds}"
        with Sandbox.create("python-ds", url=url) as first:  # the template's pool starts with it
            taken.add(first.id)
            assert first.run_code("1+1").result == "2"
        assert wait_for(lambda: len(spares(tmp_path, taken)) == 1, 60), "no spare container was made"
        (spare,) = spares(tmp_path, taken)
        link = uplink_of(spare)
        policy = {"mode": "allow", "allow": [{"host": HOST_ADDR, "ports": [p1]}]}
        with Sandbox.create("python-ds", url=url, network=policy, memory_mib=384) as sb:
            taken.add(sb.id)
            assert sb.id == spare and sb.info.timings_ms["pooled"] == 1000.0  # the spare, not a new one
            assert sb.run_code("1+1").result == "2"
            # The request's limits and egress, not the spare's template defaults and `none`.
            assert memory_limit(sb.id) == GVISOR.memory_limit_mib(Limits(1, 384, 4096, None, None)) * MIB
            assert probe(sb, [(HOST_ADDR, p1), (HOST_ADDR, net_host.ports[1])]) == {
                (HOST_ADDR, p1): "open",
                (HOST_ADDR, net_host.ports[1]): "TimeoutError",
            }
        assert gone(spare, link) == []
        assert wait_for(lambda: len(spares(tmp_path, taken)) == 1, 60), "the pool was not refilled"
        (refilled,) = spares(tmp_path, taken)
        link = uplink_of(refilled)
    # The daemon's stop destroyed its spare: processes, namespaces, uplink, cgroups.
    assert not spares(tmp_path, set()) and gone(refilled, link) == []
