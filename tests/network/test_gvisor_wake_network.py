"""A woken gVisor sandbox gets its network back: a new namespace and NIC, adopted by the restored
netstack, behind the egress policy it was created with (re-admitted, as a woken VM's), with real packets;
and nothing of it is left on the host while it is hibernated or after it is destroyed."""

from __future__ import annotations

import pytest

from tartarus.sdk import Sandbox
from tests.network.conftest import HOST_ADDR, ROOT_ADDR, NetHost, leftovers, probe
from tests.network.test_gvisor_egress_api import gone, gvisor_daemon, uplink_of

pytestmark = pytest.mark.vm

__all__ = ["gvisor_daemon"]  # the module's daemon fixture, shared


def test_a_woken_gvisor_sandbox_keeps_its_egress_policy(gvisor_daemon: str, net_host: NetHost) -> None:
    p1, p2 = net_host.ports
    policy = {"mode": "allow", "allow": [{"host": HOST_ADDR, "ports": [p1]}]}
    targets = [(HOST_ADDR, p1), (HOST_ADDR, p2), (ROOT_ADDR, p1)]
    expected = {targets[0]: "open", targets[1]: "TimeoutError", targets[2]: "TimeoutError"}
    with Sandbox.create("python-ds", url=gvisor_daemon, network=policy) as sb:
        assert sb.info.backend == "gvisor"
        assert probe(sb, targets) == expected
        link = uplink_of(sb.id)
        seen = net_host.listener.connections(p1)
        sb.hibernate()
        assert gone(sb.id, link) == []  # a hibernated sandbox holds no namespace, uplink or cgroup
        assert sb.wake().network == "allow"
        assert probe(sb, targets) == expected
        assert net_host.listener.connections(p1) == seen + 1
        link = uplink_of(sb.id)
    assert gone(sb.id, link) == [] and leftovers(sb.id) == []
