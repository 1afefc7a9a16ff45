"""A sandbox keeps its containment through hibernation and forks: the network policy it was created
with is enforced again, with real packets, once it wakes or is copied; a quarantined one stays put."""

from __future__ import annotations

from pathlib import Path

import pytest

from tartarus.errors import Quarantined
from tartarus.sdk import Sandbox
from tests.network.conftest import HOST_ADDR, NetHost, leftovers, probe

pytestmark = pytest.mark.vm


def test_woken_and_forked_sandboxes_keep_their_network_policy(
    net_daemon: tuple[str, Path], net_host: NetHost
) -> None:
    url, _ = net_daemon
    p1, p2 = net_host.ports
    policy = {"mode": "allow", "allow": [{"host": HOST_ADDR, "ports": [p1]}]}
    with Sandbox.create("python-ds", url=url, network=policy) as sb:
        sb.hibernate()
        assert sb.wake().network == "allow"
        assert probe(sb, [(HOST_ADDR, p1), (HOST_ADDR, p2)]) == {
            (HOST_ADDR, p1): "open",
            (HOST_ADDR, p2): "TimeoutError",
        }
        (copy,) = sb.fork(1)
        with copy:
            assert copy.info.network == "allow"
            assert probe(copy, [(HOST_ADDR, p1), (HOST_ADDR, p2)]) == {
                (HOST_ADDR, p1): "open",
                (HOST_ADDR, p2): "TimeoutError",
            }
        assert not leftovers(copy.id)
    assert not leftovers(sb.id)


def test_a_quarantined_sandbox_is_not_hibernated_or_forked(net_daemon: tuple[str, Path]) -> None:
    url, _ = net_daemon
    with Sandbox.create("python-ds", url=url, network="full") as sb:
        sb.quarantine("under investigation")
        with pytest.raises(Quarantined, match="quarantined"):
            sb.hibernate()
        with pytest.raises(Quarantined, match="quarantined"):
            sb.fork(1)
        sb.release()
        assert sb.hibernate().state == "hibernated"
        assert sb.wake().network == "full"
