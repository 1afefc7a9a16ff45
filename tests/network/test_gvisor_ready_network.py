"""A ready gVisor sandbox (snapshots/gvisor_pool.py) waits on the `none` policy and gets its request's
network when a create binds it; a quarantined create never gets one (it is restored behind a closed
gate), with real packets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tartarus.daemon.config import DaemonConfig, ReadySizes
from tartarus.daemon.server import daemon_thread
from tartarus.policy import Policy
from tartarus.policy.model import Match, Rule
from tartarus.sdk import Sandbox
from tests.gvisor.helpers import require_gvisor
from tests.network.conftest import HOST_ADDR, NetHost, probe
from tests.ready import ready_metrics, wait_ready

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def gvisor_ready_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_gvisor()
    risky = Rule(name="risky", match=Match(labels={"risk": "high"}), verdict="quarantine", reason="high risk")
    state = tmp_path_factory.mktemp("gvisor-ready-policy-state")
    uds = state / "api.sock"
    config = DaemonConfig(
        pool_size=0,
        backend="gvisor",
        policy=Policy(rules=[risky]),
        ready_pool=ReadySizes(per_template={"python-ds": 1}),
    )
    with daemon_thread(state, uds, config):
        yield f"unix://{uds}"


def test_a_quarantined_gvisor_create_never_gets_a_ready_sandbox(
    gvisor_ready_daemon: str, net_host: NetHost
) -> None:
    url = gvisor_ready_daemon
    target = (HOST_ADDR, net_host.ports[0])
    policy = {"mode": "allow", "allow": [{"host": HOST_ADDR, "ports": [target[1]]}]}
    before = wait_ready(url, 1)
    with Sandbox.create("python-ds", url=url, network=policy, labels={"risk": "high"}) as sb:
        assert sb.info.backend == "gvisor"
        assert sb.info.quarantined and "ready" not in sb.info.timings_ms
        assert probe(sb, [target]) == {target: "TimeoutError"}
        after = ready_metrics(url)
        assert (after.size, after.hits, after.misses - before.misses) == (1, before.hits, 1)
    # The same request without the quarantine verdict takes the ready one, and its policy applies.
    with Sandbox.create("python-ds", url=url, network=policy) as sb:
        assert "ready" in sb.info.timings_ms and not sb.info.quarantined
        assert probe(sb, [target]) == {target: "open"}


def test_a_ready_gvisor_sandbox_has_no_egress_unless_its_create_asks(
    gvisor_ready_daemon: str, net_host: NetHost
) -> None:
    url = gvisor_ready_daemon
    target = (HOST_ADDR, net_host.ports[0])
    wait_ready(url, 1)
    with Sandbox.create("python-ds", url=url) as sb:
        assert "ready" in sb.info.timings_ms and sb.info.network == "none"
        assert probe(sb, [target]) != {target: "open"}
