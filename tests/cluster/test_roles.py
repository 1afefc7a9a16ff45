"""The cluster roles with real parts: PostgreSQL and three `tartarus agent` processes, each in a network
namespace of its own (own address and state dir; `roles.ClusterNet`), one of them quarantine capacity,
and two `tartarus gateway` processes on loopback; the VM tests boot real sandboxes.

A sandbox created through one gateway is served through the other: streamed exec, files of a few MiB
both ways, the terminal WebSocket, an exposed port; agents refuse anything without the agent token; a
killed agent's sandbox gets a clear answer naming its node (503 while the lease may come back, 410
node_lost after); a node cut off by nftables is given up and fenced when it heals; the reconciler moves
when its gateway is killed; a quarantine verdict lands on quarantine capacity only.
"""

from __future__ import annotations

import base64
import hashlib
import json
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
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect as ws_connect

from tartarus.cluster import events
from tartarus.cluster.db import connect
from tartarus.cluster.membership import Membership
from tartarus.cluster.model import NodeSpec, NodeState, PlacementState, Resources
from tartarus.cluster.placement import Placer
from tests.cluster.roles import ClusterNet, Node, Role, free_port
from tests.conftest import qemu_pids, wait_until
from tests.served import TARTARUS

LEASE_S = 3.0
GRACE_S = 2.0
QUARANTINE_NODE = "node-q"
# The same policy for gateways (which place by its verdicts) and agents (which confine by them).
POLICY = """
rules:
  - name: risky-to-quarantine
    match: {labels: {risk: high}}
    verdict: quarantine
    reason: risky workloads run on quarantine capacity
  - name: no-forbidden
    match: {labels: {risk: forbidden}}
    verdict: reject
    reason: forbidden workloads run nowhere
quarantine: {cpu_fraction: 1.0}
"""


@dataclass
class Cluster:
    root: Path
    url: str
    token: str
    net: ClusterNet
    agents: list[Role]
    gateways: list[Role]
    key: str  # an admin API key (the first agent's local one, in the shared store)
    nodes: dict[str, Node] = field(default_factory=dict)

    def client(self, gateway: int) -> httpx.Client:
        return httpx.Client(
            base_url=self.gateways[gateway].url, headers={"Authorization": f"Bearer {self.key}"}, timeout=120
        )

    @property
    def env(self) -> dict[str, str]:
        return {"TARTARUS_POLICY": str(self.root / "policy.yaml")}

    def start_agent(self, name: str, *, wait: bool = True) -> Role:
        """The agent `name` in its namespace (made on its first start, kept for a restart)."""
        if name not in self.nodes:
            self.nodes[name] = self.net.node(name)
        labels = ("--label", "quarantine") if name == QUARANTINE_NODE else ()
        args = ("--lease", str(LEASE_S), "--slots", "4", *labels)
        node = self.nodes[name]
        return Role(self.root, "agent", name, self.url, self.token, *args, env=self.env, node=node, wait=wait)

    def start_gateway(self, name: str, *, wait: bool = True) -> Role:
        args = ("--grace", str(GRACE_S))
        return Role(self.root, "gateway", name, self.url, self.token, *args, env=self.env, wait=wait)

    def agent(self, name: str) -> Role:
        return next(a for a in self.agents if a.name == name)


@pytest.fixture(scope="module")
def cluster(
    cluster_server_url: str, cluster_net: ClusterNet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    from tests.pg import fresh_database

    url = fresh_database(cluster_server_url, "roles_" + secrets.token_hex(4))
    root = tmp_path_factory.mktemp("cluster")
    (root / "policy.yaml").write_text(POLICY)
    token = secrets.token_hex(32)
    c = Cluster(root, url, token, cluster_net, [], [], "")
    try:
        c.agents = [c.start_agent("node-a")]  # first alone: it makes the schemas and the admin key
        c.agents += [c.start_agent(name, wait=False) for name in ("node-b", QUARANTINE_NODE)]
        c.gateways = [c.start_gateway(f"gw-{i}", wait=False) for i in (1, 2)]
        for role in [*c.agents, *c.gateways]:
            role.wait_up()
        c.key = (c.agents[0].state / "admin.key").read_text().strip()
        yield c
    finally:
        for role in [*c.gateways, *c.agents]:
            role.stop()
        for node in c.nodes.values():
            cluster_net.remove(node)


def test_an_agent_serves_only_gateways(cluster: Cluster) -> None:
    agent = cluster.agents[0].url
    body = {"template": "python-ds"}
    assert httpx.get(f"{agent}/v1/health").status_code == 200  # load balancers and readiness probes
    for headers in (
        {},
        {"Authorization": f"Bearer {cluster.key}"},  # a valid API key is not the agent token
        {"Authorization": f"Bearer {secrets.token_hex(32)}"},
        {"Authorization": f"Bearer {cluster.token}x", "x-tartarus-caller": "k local admin"},
    ):
        for method, path in (("POST", "/v1/sandboxes"), ("GET", "/v1/sandboxes"), ("GET", "/v1/keys")):
            answer = httpx.request(method, f"{agent}{path}", json=body, headers=headers)
            assert answer.status_code == 401, (headers.keys(), path, answer.text)
            assert answer.json()["error"]["code"] == "unauthorized"
            assert cluster.token not in answer.text
    # The token without a caller is refused too: the agent needs to know whose the call is.
    answer = httpx.get(f"{agent}/v1/sandboxes", headers={"Authorization": f"Bearer {cluster.token}"})
    assert answer.status_code == 401
    # And the gateway is where keys are checked.
    assert httpx.get(f"{cluster.gateways[0].url}/v1/sandboxes").status_code == 401
    with cluster.client(0) as gw:
        assert gw.get("/v1/sandboxes").status_code == 200
    for log in cluster.root.glob("*.log"):
        assert cluster.token not in log.read_text()
    with connect(cluster.url) as conn:
        nodes = {n.name: n for n in Membership(conn).nodes()}
    assert set(nodes) == {"node-a", "node-b", QUARANTINE_NODE} and all(n.healthy for n in nodes.values())
    assert all("python-ds" in n.templates for n in nodes.values())
    assert [n for n in nodes if "quarantine" in nodes[n].labels] == [QUARANTINE_NODE]
    # Each agent serves on its own namespace's address, not on the host's loopback.
    assert {nodes[a.name].address for a in cluster.agents} == {
        f"{n.address}:8701" for n in cluster.nodes.values()
    }


def _exec_events(gw: httpx.Client, sandbox_id: str, script: str) -> list[tuple[float, dict[str, object]]]:
    """The exec stream's events with the time each arrived."""
    events = []
    body = {"argv": ["sh", "-c", script]}
    with gw.stream("POST", f"/v1/sandboxes/{sandbox_id}/exec", json=body) as stream:
        assert stream.status_code == 200, stream.read()
        for line in stream.iter_lines():
            if line:
                events.append((time.monotonic(), json.loads(line)))
    return events


def test_a_sandbox_placed_through_one_gateway_is_served_through_the_other(cluster: Cluster) -> None:
    with cluster.client(0) as gw1, cluster.client(1) as gw2:
        created = gw1.post("/v1/sandboxes", json={"template": "python-ds"})
        assert created.status_code == 201, created.text
        sandbox_id = created.json()["id"]
        try:
            with connect(cluster.url) as conn:
                where = Placer(conn).locate(sandbox_id)
            assert where.state == "running" and where.node in ("node-a", "node-b")
            assert sandbox_id in {s["id"] for s in gw2.get("/v1/sandboxes").json()["sandboxes"]}
            assert gw2.get(f"/v1/sandboxes/{sandbox_id}").json()["id"] == sandbox_id

            # Streamed, not buffered: the first line arrives while the command still runs.
            events = _exec_events(gw2, sandbox_id, "echo first; sleep 3; echo second")
            out = [(t, base64.b64decode(str(e["data"]))) for t, e in events if e["type"] == "stdout"]
            exit_at = next(t for t, e in events if e["type"] == "exit")
            assert [data for _, data in out] == [b"first\n", b"second\n"]
            assert exit_at - out[0][0] > 2.0, "the first line came only with the end of the command"

            # A few MiB each way, streamed both ways through the gateway.
            blob = os.urandom(6 << 20)
            chunks = (blob[i : i + (1 << 20)] for i in range(0, len(blob), 1 << 20))
            put = gw2.put(f"/v1/sandboxes/{sandbox_id}/files", params={"path": "/tmp/blob"}, content=chunks)
            assert put.status_code == 200, put.text
            assert put.json()["size"] == len(blob)
            digest = hashlib.sha256()
            with gw1.stream("GET", f"/v1/sandboxes/{sandbox_id}/files", params={"path": "/tmp/blob"}) as got:
                assert got.status_code == 200
                for chunk in got.iter_raw():
                    digest.update(chunk)
            assert digest.hexdigest() == hashlib.sha256(blob).hexdigest()
            seen = _exec_events(gw1, sandbox_id, "sha256sum /tmp/blob")
            stdout = b"".join(base64.b64decode(str(e["data"])) for _, e in seen if e["type"] == "stdout")
            assert stdout.split()[0].decode() == hashlib.sha256(blob).hexdigest()

            # The terminal WebSocket, through the other gateway.
            ws_url = cluster.gateways[1].url.replace("http", "ws") + f"/v1/sandboxes/{sandbox_id}/pty?argv=sh"
            with ws_connect(ws_url, additional_headers={"Authorization": f"Bearer {cluster.key}"}) as ws:
                ws.send(b"echo $((6 * 7))\nexit 3\n")
                screen, ended = b"", None
                for frame in ws:
                    if isinstance(frame, bytes):
                        screen += frame
                    else:
                        ended = json.loads(frame)
            assert b"42" in screen
            assert ended == {"type": "exit", "exit_code": 3, "signal": None}

            # An exposed port, asked for through a gateway: the address is on the agent's host.
            server = "setsid python3 -m http.server 8000 --directory /tmp >/dev/null 2>&1 < /dev/null &"
            _exec_events(gw2, sandbox_id, server)
            exposed = gw2.post(f"/v1/sandboxes/{sandbox_id}/ports", json={"port": 8000})
            assert exposed.status_code == 200, exposed.text
            address = f"{exposed.json()['host']}:{exposed.json()['host_port']}"
            assert wait_until(lambda: _fetch(address, "/blob") == blob, timeout=60)

            # Another tenant does not see it through either gateway.
            other = gw1.post("/v1/keys", json={"tenant": "other-" + secrets.token_hex(3)}).json()["key"]
            for gw in (gw1, gw2):
                hidden = gw.get(f"/v1/sandboxes/{sandbox_id}", headers={"Authorization": f"Bearer {other}"})
                assert hidden.status_code == 404
        finally:
            assert gw2.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204
        # Its placement (and the node's capacity) is released when it ends.
        with connect(cluster.url) as conn:
            assert wait_until(lambda: _placed(conn, sandbox_id) is False, timeout=10)
        assert gw1.get(f"/v1/sandboxes/{sandbox_id}").status_code == 404


def _fetch(address: str, path: str) -> bytes | None:
    """GET from the guest's server through its exposed address (it may still be starting)."""
    try:
        return httpx.get(f"http://{address}{path}", timeout=10).raise_for_status().content
    except httpx.HTTPError:
        return None


def _placed(conn: object, sandbox_id: str) -> bool:
    from tartarus.errors import NotFound

    try:
        Placer(conn).locate(sandbox_id)  # type: ignore[arg-type]
    except NotFound:
        return False
    return True


def test_a_create_moves_on_when_the_best_node_does_not_answer(cluster: Cluster) -> None:
    """A node that looks best (roomy, holds the template, lease valid) but whose agent is gone: the
    gateway gives its reservation back and places the sandbox on a node that answers."""
    ghost = NodeSpec(
        "node-ghost",
        f"127.0.0.1:{free_port()}",
        Resources(vcpus=1000, memory_mib=10**7, disk_mib=10**7, slots=1000),
        templates=frozenset({"python-ds"}),
    )
    with connect(cluster.url) as conn:
        Membership(conn, lease_s=120).register(ghost)
        try:
            with cluster.client(0) as gw:
                created = gw.post("/v1/sandboxes", json={"template": "python-ds"})
                assert created.status_code == 201, created.text
                sandbox_id = created.json()["id"]
                try:
                    assert Placer(conn).locate(sandbox_id).node in ("node-a", "node-b")
                    refused = [e for e in events.recent(conn, node="node-ghost") if e.kind == "released"]
                    assert refused and "did not answer" in refused[0].detail
                finally:
                    assert gw.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204
        finally:
            conn.execute("DELETE FROM cluster.nodes WHERE name = 'node-ghost'")


def test_the_sdk_works_through_either_gateway(cluster: Cluster) -> None:
    """The README's cluster flow: a tenant key made with `tartarus keys create` on the shared database,
    then the SDK against a gateway as against `serve`."""
    from tartarus.sdk import Sandbox

    tenant = "alice-" + secrets.token_hex(3)
    env = {
        **os.environ,
        "TARTARUS_DATABASE_URL": cluster.url,
        "TARTARUS_STATE_DIR": str(cluster.root / "cli"),
    }
    made = subprocess.run(
        [str(TARTARUS), "keys", "create", "--tenant", tenant],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.splitlines()[-1]
    with Sandbox.create("python-ds", url=cluster.gateways[0].url, api_key=key, labels={"team": "ml"}) as sb:
        assert sb.commands.run("python3 -c 'print(6*7)'").stdout.strip() == "42"
        assert sb.info.tenant == tenant
        listed = Sandbox.list(url=cluster.gateways[1].url, api_key=key, labels={"team": "ml"})
        assert [s.id for s in listed] == [sb.id]
        sb.files.write("/tmp/note.txt", b"through the gateway")
        assert sb.files.read("/tmp/note.txt") == b"through the gateway"


def test_a_tenant_quota_holds_over_the_whole_cluster(cluster: Cluster) -> None:
    """A tenant allowed one sandbox has one on node A: a second create through the other gateway is
    refused, although node B (the only node taking sandboxes now) runs none of that tenant's."""
    tenant = "quota-" + secrets.token_hex(3)
    with cluster.client(0) as gw1, cluster.client(1) as gw2:
        key = gw1.post("/v1/keys", json={"tenant": tenant}).json()["key"]
        gw1.put(f"/v1/tenants/{tenant}/quota", json={"max_sandboxes": 1}).raise_for_status()
        as_tenant = {"Authorization": f"Bearer {key}"}
        first = gw1.post("/v1/sandboxes", json={"template": "python-ds"}, headers=as_tenant)
        assert first.status_code == 201, first.text
        with connect(cluster.url) as conn:
            node = Placer(conn).locate(first.json()["id"]).node
        assert _nodes_cli(cluster, "cordon", node).returncode == 0
        try:
            second = gw2.post("/v1/sandboxes", json={"template": "python-ds"}, headers=as_tenant)
            assert second.status_code == 429, second.text
            assert second.json()["error"]["code"] == "quota_exceeded"
            assert "max_sandboxes=1" in second.json()["error"]["message"]
            # Its first sandbox gone, the tenant may create again (on the other node).
            assert gw2.delete(f"/v1/sandboxes/{first.json()['id']}", headers=as_tenant).status_code == 204
            third = gw2.post("/v1/sandboxes", json={"template": "python-ds"}, headers=as_tenant)
            assert third.status_code == 201, third.text
            assert gw2.delete(f"/v1/sandboxes/{third.json()['id']}", headers=as_tenant).status_code == 204
        finally:
            assert _nodes_cli(cluster, "uncordon", node).returncode == 0


def _nodes_cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TARTARUS_DATABASE_URL": cluster.url, "TARTARUS_AGENT_TOKEN": cluster.token}
    return subprocess.run(
        [str(TARTARUS), "nodes", *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_nodes_drain_hibernates_a_nodes_sandboxes_and_new_ones_go_elsewhere(cluster: Cluster) -> None:
    with cluster.client(0) as gw:
        created = gw.post("/v1/sandboxes", json={"template": "python-ds"})
        assert created.status_code == 201, created.text
        sandbox_id = created.json()["id"]
        try:
            with connect(cluster.url) as conn:
                node = Placer(conn).locate(sandbox_id).node
            drained = _nodes_cli(cluster, "drain", node)
            assert drained.returncode == 0, drained.stderr
            assert f"{sandbox_id} hibernated" in drained.stdout
            assert gw.get(f"/v1/sandboxes/{sandbox_id}").json()["state"] == "hibernated"
            listed = json.loads(_nodes_cli(cluster, "ls", "--json").stdout)
            assert {n["name"]: n["admin"] for n in listed}[node] == "draining"
            # New sandboxes go to the other node while this one drains.
            other = gw.post("/v1/sandboxes", json={"template": "python-ds"})
            assert other.status_code == 201, other.text
            with connect(cluster.url) as conn:
                assert Placer(conn).locate(other.json()["id"]).node != node
            assert gw.delete(f"/v1/sandboxes/{other.json()['id']}").status_code == 204
            # The hibernated one wakes on its node at its next call (these agents have no object store).
            events_ = _exec_events(gw, sandbox_id, "echo awake")
            assert any(e["type"] == "stdout" for _, e in events_)
        finally:
            assert _nodes_cli(cluster, "uncordon", node).returncode == 0
            assert gw.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204


def test_a_fenced_agent_kills_what_the_cluster_gave_up_and_registers_again(cluster: Cluster) -> None:
    """The cluster gives up on a sandbox and a newer epoch replaces its node's (as after a partition):
    the agent's next renewal is refused, it kills that sandbox (never served twice) and re-registers."""
    with cluster.client(0) as gw:
        created = gw.post("/v1/sandboxes", json={"template": "python-ds"})
        assert created.status_code == 201, created.text
        sandbox_id = created.json()["id"]
    with connect(cluster.url) as conn:
        node = Placer(conn).locate(sandbox_id).node
        agent = next(a for a in cluster.agents if a.name == node)
        with conn.transaction():
            conn.execute("UPDATE cluster.placements SET state = 'lost' WHERE sandbox_id = %s", (sandbox_id,))
            row = conn.execute(
                "UPDATE cluster.nodes SET epoch = epoch + 1 WHERE name = %s RETURNING epoch", (node,)
            ).fetchone()
        assert row is not None
        replaced = int(row[0])
        direct = {"Authorization": f"Bearer {cluster.token}", "x-tartarus-caller": "test local admin"}

        def gone() -> bool:
            listed = httpx.get(f"{agent.url}/v1/sandboxes", headers=direct, timeout=10)
            return listed.status_code == 200 and listed.json()["sandboxes"] == []

        assert wait_until(gone, timeout=30)
        assert Membership(conn).node(node).epoch == replaced + 1
        assert any(e.kind == "fenced" for e in events.recent(conn, node=node))


def test_a_sandbox_of_a_killed_agent_gets_a_clear_lost_node_error(cluster: Cluster) -> None:
    with cluster.client(0) as gw1, cluster.client(1) as gw2:
        created = gw1.post("/v1/sandboxes", json={"template": "python-ds"})
        assert created.status_code == 201, created.text
        sandbox_id = created.json()["id"]
        with connect(cluster.url) as conn:
            node = Placer(conn).locate(sandbox_id).node
        index = [a.name for a in cluster.agents].index(node)
        cluster.agents[index].stop(signal.SIGKILL)  # its VM runs on, orphaned

        answers: list[int] = []

        def lost() -> bool:
            started = time.monotonic()
            answer = gw2.get(f"/v1/sandboxes/{sandbox_id}", timeout=10)
            assert time.monotonic() - started < 5, "a call for a dead node's sandbox must not hang"
            answers.append(answer.status_code)
            error = answer.json()["error"]
            assert node in error["message"]
            assert error["code"] in ("node_unreachable", "node_unavailable", "node_lost")
            return bool(error["code"] == "node_lost")

        assert wait_until(lost, timeout=LEASE_S + GRACE_S + 20)
        assert answers[-1] == 410 and 500 not in answers
        exec_ = gw1.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"argv": ["true"]})
        assert exec_.status_code == 410 and node in exec_.json()["error"]["message"]

        # The agent comes back: it re-registers under a new epoch and kills what the cluster gave up on,
        # so the sandbox never runs twice (and nothing of it is left on the host).
        with connect(cluster.url) as conn:
            old_epoch = Membership(conn).node(node).epoch
        cluster.agents[index] = cluster.start_agent(node)
        with connect(cluster.url) as conn:
            assert Membership(conn).node(node).epoch == old_epoch + 1
        listed = httpx.get(
            f"{cluster.agents[index].url}/v1/sandboxes",
            headers={"Authorization": f"Bearer {cluster.token}", "x-tartarus-caller": "test local admin"},
        )
        assert listed.status_code == 200 and listed.json()["sandboxes"] == []
        assert gw2.get(f"/v1/sandboxes/{sandbox_id}").status_code == 410


def _vmms(agent: Role, sandbox_id: str) -> set[int]:
    """The VMM processes of `sandbox_id` among the agent's (its state dir is in their command lines)."""
    return {
        p for p in qemu_pids(agent.state) if sandbox_id.encode() in Path(f"/proc/{p}/cmdline").read_bytes()
    }


def _listed_by_agent(cluster: Cluster, agent: Role) -> list[str]:
    """The agent's own list, asked directly (the agent token; as an admin: every tenant's)."""
    direct = {"Authorization": f"Bearer {cluster.token}", "x-tartarus-caller": "test local admin"}
    answer = httpx.get(f"{agent.url}/v1/sandboxes", headers=direct, timeout=10)
    assert answer.status_code == 200, answer.text
    return [s["id"] for s in answer.json()["sandboxes"]]


def test_a_partitioned_node_is_given_up_and_fenced_when_it_heals(cluster: Cluster) -> None:
    """nftables in the node's namespace drop all its traffic: its lease lapses, the cluster declares it
    lost and its running sandbox `lost` (410 through either gateway) while the VM still runs there, cut
    off. Healed, the agent hears it was fenced, kills that sandbox and registers under a new epoch: the
    sandbox never answers again, through either gateway or on the agent itself."""
    with cluster.client(0) as gw1, cluster.client(1) as gw2:
        created = gw1.post("/v1/sandboxes", json={"template": "python-ds"})
        assert created.status_code == 201, created.text
        sandbox_id = created.json()["id"]
        with connect(cluster.url) as conn:
            node = Placer(conn).locate(sandbox_id).node
            epoch = Membership(conn).node(node).epoch
        agent = cluster.agent(node)
        assert agent.node is not None
        vmm = _vmms(agent, sandbox_id)
        assert len(vmm) == 1
        assert gw2.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"argv": ["true"]}).status_code == 200

        agent.node.partition()
        try:
            with pytest.raises(httpx.TransportError):  # the gateways cannot reach it either
                httpx.get(f"{agent.url}/v1/health", timeout=2)

            # Until its lease lapses a call would wait for the agent (the proxy's connect timeout);
            # after, the gateways answer at once: 503 while it may come back, then 410.
            with connect(cluster.url) as conn:
                membership = Membership(conn)
                assert wait_until(lambda: not membership.node(node).healthy, timeout=LEASE_S + 10)

            def lost() -> bool:
                started = time.monotonic()
                answer = gw2.get(f"/v1/sandboxes/{sandbox_id}", timeout=10)
                assert time.monotonic() - started < 5, "a call for a lapsed node's sandbox must not hang"
                assert answer.status_code in (410, 503) and node in answer.json()["error"]["message"]
                return answer.status_code == 410

            assert wait_until(lost, timeout=GRACE_S + 30)
            with connect(cluster.url) as conn:
                assert Placer(conn).locate(sandbox_id).state == PlacementState.LOST
                assert Membership(conn).node(node).state == NodeState.LOST
            for gw in (gw1, gw2):
                refused = gw.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"argv": ["true"]})
                assert refused.status_code == 410 and refused.json()["error"]["code"] == "node_lost"
            assert vmm <= qemu_pids(), "cut off, the agent cannot know yet: its VM runs on"
        finally:
            agent.node.heal()

        # Healed: fenced at its next renewal, it kills what the cluster gave up on and joins again.
        assert wait_until(lambda: not vmm & qemu_pids(), timeout=90), "the given-up sandbox still runs"
        with connect(cluster.url) as conn:
            membership = Membership(conn)
            assert wait_until(lambda: membership.node(node).healthy, timeout=30)
            assert membership.node(node).epoch > epoch
            assert any(e.kind == "fenced" for e in events.recent(conn, node=node))
        assert sandbox_id not in _listed_by_agent(cluster, agent)
        # Cut off, its renewals failed (none hung on the dead connection until TCP gave up).
        assert _scrape(agent, cluster.key)["tartarus_node_lease_renewal_failures_total"] >= 1
        for gw in (gw1, gw2):
            assert gw.get(f"/v1/sandboxes/{sandbox_id}").status_code == 410
            assert sandbox_id not in {s["id"] for s in gw.get("/v1/sandboxes").json()["sandboxes"]}


def _scrape(gateway: Role, key: str) -> dict[str, float]:
    """A role's unlabelled samples by name (its /metrics, with an admin key)."""
    text = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_the_reconciler_moves_to_another_gateway_when_its_gateway_is_killed(cluster: Cluster) -> None:
    """One gateway sweeps; `kill -9` it and the other takes the advisory lock over and does the work:
    a node whose lease lapses afterwards is declared lost by the survivor."""

    def leaders() -> list[int]:
        return [
            i
            for i, g in enumerate(cluster.gateways)
            if _scrape(g, cluster.key)["tartarus_gateway_reconciler_leader"]
        ]

    assert wait_until(lambda: len(leaders()) == 1, timeout=30)
    (leader,) = leaders()
    survivor = cluster.gateways[1 - leader]
    passes = _scrape(survivor, cluster.key)["tartarus_gateway_reconciler_passes_total"]
    lost = _scrape(survivor, cluster.key)["tartarus_cluster_nodes_lost_total"]
    ghost = NodeSpec(
        "node-gone", f"{cluster.net.host}:1", Resources(1, 512, 0, 1), labels=frozenset({"ghost"})
    )
    assert cluster.gateways[leader].stop(signal.SIGKILL) == -signal.SIGKILL
    try:
        with connect(cluster.url) as conn:
            Membership(conn, lease_s=1).register(ghost)  # it never renews
            membership = Membership(conn)
            assert wait_until(lambda: membership.node("node-gone").state == NodeState.LOST, timeout=30)
            assert any(e.kind == "node_lost" for e in events.recent(conn, node="node-gone"))
        after = _scrape(survivor, cluster.key)
        assert after["tartarus_cluster_nodes_lost_total"] == lost + 1
        assert after["tartarus_gateway_reconciler_passes_total"] > passes
        assert after["tartarus_gateway_reconciler_leader"] == 1
    finally:
        with connect(cluster.url) as conn:
            conn.execute("DELETE FROM cluster.nodes WHERE name = 'node-gone'")
        cluster.gateways[leader] = cluster.start_gateway(cluster.gateways[leader].name)


def test_a_quarantine_verdict_lands_only_on_quarantine_capacity(cluster: Cluster) -> None:
    """The policy quarantines `risk=high`: the gateway places such a create on the quarantine-labelled
    node (never the others), where it runs confined; an ordinary create never lands there. With no
    schedulable quarantine node, the create is refused with an error saying why; a rejected one is
    refused by the gateway before anything is reserved."""
    risky = {"template": "python-ds", "labels": {"risk": "high"}}
    with cluster.client(0) as gw1, cluster.client(1) as gw2:
        made: list[str] = []
        try:
            for gw in (gw1, gw2):
                created = gw.post("/v1/sandboxes", json=risky)
                assert created.status_code == 201, created.text
                made.append(created.json()["id"])
            ordinary = gw1.post("/v1/sandboxes", json={"template": "python-ds"})
            assert ordinary.status_code == 201, ordinary.text
            made.append(ordinary.json()["id"])
            with connect(cluster.url) as conn:
                placed = [Placer(conn).locate(i).node for i in made]
            assert placed[:2] == [QUARANTINE_NODE] * 2 and placed[2] != QUARANTINE_NODE
            info = gw2.get(f"/v1/sandboxes/{made[0]}").json()
            assert info["quarantined"] is True and "risky workloads" in info["quarantine_reason"]
            assert gw2.get(f"/v1/sandboxes/{made[2]}").json()["quarantined"] is False
        finally:
            for sandbox_id in made:
                assert gw1.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204

        assert _nodes_cli(cluster, "cordon", QUARANTINE_NODE).returncode == 0
        try:
            refused = gw2.post("/v1/sandboxes", json=risky)
            assert refused.status_code == 503, refused.text
            error = refused.json()["error"]
            assert error["code"] == "no_capacity"
            assert "risky workloads run on quarantine capacity" in error["message"]
            assert "labelled quarantine" in error["message"]
        finally:
            assert _nodes_cli(cluster, "uncordon", QUARANTINE_NODE).returncode == 0

        with connect(cluster.url) as conn:
            last = events.recent(conn, limit=1)
            forbidden = gw1.post(
                "/v1/sandboxes", json={"template": "python-ds", "labels": {"risk": "forbidden"}}
            )
            assert forbidden.status_code == 403, forbidden.text
            assert forbidden.json()["error"]["code"] == "policy_denied"
            assert "forbidden workloads run nowhere" in forbidden.json()["error"]["message"]
            assert events.recent(conn, limit=1) == last, "a rejected create reserved nothing"
