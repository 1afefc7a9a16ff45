"""Hibernated sandboxes in the object store, with real parts: PostgreSQL and SeaweedFS on the cluster
network's host address, two `tartarus agent` processes configured with the store, each in a network
namespace of its own (`roles.ClusterNet`), and two `tartarus gateway` processes; real VMs.

A sandbox hibernated on its node wakes on the other one once that node is gone (`kill -9`) or drained,
with its Python variables, files and background processes, through either gateway, and is never woken
twice.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tartarus.cluster import events
from tartarus.cluster.db import Connection, connect
from tartarus.cluster.membership import Membership
from tartarus.cluster.model import Location, NodeState, PlacementState
from tartarus.cluster.objects import S3Config
from tartarus.cluster.placement import Placer
from tartarus.sdk import Sandbox
from tests.cluster.roles import ClusterNet, Node, Role
from tests.conftest import wait_until
from tests.served import TARTARUS

LEASE_S = 3.0
TICKER = (
    "setsid sh -c 'while true; do echo tick >> /root/ticks; sleep 0.2; done' >/dev/null 2>&1 </dev/null &"
)


@dataclass
class Cluster:
    root: Path
    url: str
    token: str
    s3: dict[str, str]
    agents: dict[str, Role]
    gateways: list[Role]
    key: str
    net: ClusterNet
    namespaces: dict[str, Node] = field(default_factory=dict)

    def start_agent(self, name: str) -> Role:
        """The agent `name` in its namespace (made on its first start, kept for a restart)."""
        if name not in self.namespaces:
            self.namespaces[name] = self.net.node(name)
        role = Role(
            self.root,
            "agent",
            name,
            self.url,
            self.token,
            "--lease",
            str(LEASE_S),
            "--slots",
            "4",
            env=self.s3,
            node=self.namespaces[name],
        )
        self.agents[name] = role
        return role

    def where(self, sandbox_id: str) -> Location:
        with connect(self.url) as conn:
            return Placer(conn).locate(sandbox_id)

    def nodes(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TARTARUS_DATABASE_URL": self.url, "TARTARUS_AGENT_TOKEN": self.token}
        return subprocess.run(
            [str(TARTARUS), "nodes", *args], env=env, capture_output=True, text=True, timeout=300, check=False
        )


@pytest.fixture(scope="module")
def cluster(
    cluster_server_url: str,
    cluster_net: ClusterNet,
    s3_config: S3Config,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    from tests.pg import fresh_database

    url = fresh_database(cluster_server_url, "stored_" + secrets.token_hex(4))
    root = tmp_path_factory.mktemp("stored")
    token = secrets.token_hex(32)
    s3 = {
        "TARTARUS_S3_ENDPOINT": s3_config.endpoint,
        "TARTARUS_S3_BUCKET": "stored-" + secrets.token_hex(4),
        "TARTARUS_S3_ACCESS_KEY": s3_config.access_key,
        "TARTARUS_S3_SECRET_KEY": s3_config.secret_key,
    }
    c = Cluster(root, url, token, s3, {}, [], "", cluster_net)
    try:
        c.start_agent("node-a")
        c.start_agent("node-b")
        c.key = (c.agents["node-a"].state / "admin.key").read_text().strip()
        c.gateways = [Role(root, "gateway", f"gw-{i}", url, token, "--grace", "2") for i in (1, 2)]
        yield c
    finally:
        for role in [*c.gateways, *c.agents.values()]:
            role.stop()
        for node in c.namespaces.values():
            cluster_net.remove(node)
        for log in root.glob("*.log"):
            assert token not in log.read_text() and s3_config.secret_key not in log.read_text()


def _prepare(sb: Sandbox) -> None:
    """Memory, a file and a background process that the sandbox must still have after moving."""
    assert sb.run_code("answer = 6 * 7\nwords = ['moved'] * 3").error is None
    sb.files.write("/root/note.txt", b"written before the move")
    sb.commands.run(TICKER)
    assert wait_until(
        lambda: sb.commands.run("wc -l < /root/ticks").stdout.strip() not in ("", "0"), timeout=30
    )


def _intact(sb: Sandbox) -> None:
    assert sb.run_code("answer").result == "42"
    assert sb.run_code("' '.join(words)").result == "'moved moved moved'"
    assert sb.files.read("/root/note.txt") == b"written before the move"

    def ticks() -> int:
        return int(sb.commands.run("wc -l < /root/ticks").stdout.strip())

    before = ticks()
    assert wait_until(lambda: ticks() > before, timeout=30), "the background process did not run on"


def _stored(cluster: Cluster, sandbox_id: str) -> bool:
    return cluster.where(sandbox_id).stored


def test_a_hibernated_sandbox_wakes_on_another_node_after_its_node_is_killed(cluster: Cluster) -> None:
    sb = Sandbox.create("python-ds", url=cluster.gateways[0].url, api_key=cluster.key)
    try:
        home = cluster.where(sb.id).node
        other = next(n for n in cluster.agents if n != home)
        _prepare(sb)
        assert sb.hibernate().state == "hibernated"
        assert wait_until(lambda: _stored(cluster, sb.id), timeout=120), "the hibernation was not uploaded"
        # The node forgot its copy: the placement row is the only owner now.
        kept = cluster.agents[home].state / "hibernated"
        assert wait_until(lambda: not list(kept.glob(f"{sb.id}*")), timeout=10)
        listed = Sandbox.list(url=cluster.gateways[1].url, api_key=cluster.key)
        assert {s.id: s.state for s in listed}.get(sb.id) == "hibernated"

        cluster.agents[home].stop(signal.SIGKILL)
        # Past its lease and the grace period the node is lost; a sandbox in the store is not.
        with connect(cluster.url) as conn:
            members = Membership(conn)
            assert wait_until(lambda: members.node(home).state == NodeState.LOST, timeout=LEASE_S + 30)
        assert _stored(cluster, sb.id)
        t0 = time.monotonic()
        again = Sandbox.connect(sb.id, url=cluster.gateways[1].url, api_key=cluster.key)
        _intact(again)
        woke_s = time.monotonic() - t0
        where = cluster.where(sb.id)
        assert where.state == PlacementState.RUNNING and where.node == other, where
        with connect(cluster.url) as conn:
            wake_at = _placed(conn, sb.id)[0].at
        assert again.refresh().state == "running"
        with connect(cluster.url) as conn:
            placed = _placed(conn, sb.id)
        assert placed[0].node == other  # newest first
        print(f"woke on {other} in {woke_s:.1f} s (first call included)")

        # The killed node comes back: it has nothing of the sandbox, and the sandbox stays on the other.
        cluster.start_agent(home)
        assert cluster.where(sb.id).node == other
        _intact(again)

        # Deleted while in the store, it is not woken for that: its placement and record end.
        again.hibernate()
        assert wait_until(lambda: _stored(cluster, sb.id), timeout=120)
        with httpx.Client(base_url=cluster.gateways[0].url, headers=_auth(cluster), timeout=60) as gw:
            assert gw.delete(f"/v1/sandboxes/{sb.id}").status_code == 204
            assert gw.get(f"/v1/sandboxes/{sb.id}").status_code == 404
            ended = gw.get("/v1/sandboxes", params={"include_ended": "true"}).json()["sandboxes"]
        assert {s["id"]: s["state"] for s in ended}.get(sb.id) == "destroyed"
        with connect(cluster.url) as conn:
            assert not [e for e in _placed(conn, sb.id) if "woken" in e.detail and e.at > wake_at]
    finally:
        with contextlib.suppress(Exception):
            Sandbox.connect(sb.id, url=cluster.gateways[0].url, api_key=cluster.key).kill()


def test_drain_hibernates_into_the_store_and_the_sandbox_wakes_elsewhere(cluster: Cluster) -> None:
    sb = Sandbox.create("python-ds", url=cluster.gateways[0].url, api_key=cluster.key)
    home = cluster.where(sb.id).node
    try:
        _prepare(sb)
        drained = cluster.nodes("drain", home)
        assert drained.returncode == 0, drained.stderr
        assert f"{sb.id} hibernated into the object store" in drained.stdout, drained.stdout
        assert _stored(cluster, sb.id)
        # Two calls at once through the two gateways: one wake, on the other node, both served.
        with (
            httpx.Client(base_url=cluster.gateways[0].url, headers=_auth(cluster), timeout=300) as g1,
            httpx.Client(base_url=cluster.gateways[1].url, headers=_auth(cluster), timeout=300) as g2,
        ):
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(2) as pool:
                calls = [
                    pool.submit(
                        g.post, f"/v1/sandboxes/{sb.id}/exec", json={"argv": ["cat", "/root/note.txt"]}
                    )
                    for g in (g1, g2)
                ]
                answers = [c.result() for c in calls]
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        where = cluster.where(sb.id)
        assert where.state == PlacementState.RUNNING and where.node != home
        with connect(cluster.url) as conn:
            wakes = _placed(conn, sb.id)
        assert len(wakes) == 2, wakes  # its create and one wake
        _intact(Sandbox.connect(sb.id, url=cluster.gateways[1].url, api_key=cluster.key))
    finally:
        assert cluster.nodes("uncordon", home).returncode == 0
        Sandbox.connect(sb.id, url=cluster.gateways[0].url, api_key=cluster.key).kill()


def _placed(conn: Connection, sandbox_id: str) -> list[events.Event]:
    return [e for e in events.recent(conn, limit=1000) if e.sandbox_id == sandbox_id and e.kind == "placed"]


def _auth(cluster: Cluster) -> dict[str, str]:
    return {"Authorization": f"Bearer {cluster.key}"}


def test_an_agent_keeps_a_wake_only_under_a_reservation_it_holds(cluster: Cluster) -> None:
    """The agent's wake route: only with the agent token, only under its own epoch, and a wake no gateway
    reserved for it (a gateway that gave up on a slow agent released it) is stopped again, unserved: the
    sandbox stays in the store, and the next call wakes it properly."""
    sb = Sandbox.create("python-ds", url=cluster.gateways[0].url, api_key=cluster.key)
    try:
        sb.run_code("answer = 6 * 7")
        sb.hibernate()
        assert wait_until(lambda: _stored(cluster, sb.id), timeout=120)
        where = cluster.where(sb.id)
        agent = cluster.agents[where.node]
        with connect(cluster.url) as conn:
            epoch = Membership(conn).node(where.node).epoch
        body = {"sandbox_id": sb.id, "capture": where.capture, "epoch": epoch}
        token = {"Authorization": f"Bearer {cluster.token}"}
        assert httpx.post(f"{agent.url}/v1/cluster/wake", json=body).status_code == 401
        stale = httpx.post(f"{agent.url}/v1/cluster/wake", json={**body, "epoch": epoch - 1}, headers=token)
        assert stale.status_code == 409, stale.text
        assert stale.json()["error"]["code"] == "conflict"  # refused before fetching anything
        unreserved = httpx.post(f"{agent.url}/v1/cluster/wake", json=body, headers=token, timeout=120)
        assert unreserved.status_code == 409 and unreserved.json()["error"]["code"] == "reservation_lost"
        assert _stored(cluster, sb.id)
        direct = {**token, "x-tartarus-caller": "test local admin"}
        listed = httpx.get(f"{agent.url}/v1/sandboxes", headers=direct).json()["sandboxes"]
        assert sb.id not in {s["id"] for s in listed}
        assert {s.id: s.state for s in Sandbox.list(url=cluster.gateways[1].url, api_key=cluster.key)}[
            sb.id
        ] == "hibernated"
        again = Sandbox.connect(sb.id, url=cluster.gateways[1].url, api_key=cluster.key)
        assert again.run_code("answer").result == "42"
    finally:
        with contextlib.suppress(Exception):
            Sandbox.connect(sb.id, url=cluster.gateways[0].url, api_key=cluster.key).kill()
