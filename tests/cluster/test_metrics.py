"""The cluster's metrics and audit trail from real processes: one `tartarus agent`, one `tartarus gateway`,
PostgreSQL, and a second node registered with no agent behind it (it never renews, so it lapses and the
gateway's reconciler declares it lost). A sandbox created and read through the gateway shows up in the
placement histogram, the proxied request counts, the node gauges and the cluster's events; the agent
reports its lease; both scrapes need an admin key; every query of the cluster dashboard and alert rules
names a metric these processes export."""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tartarus.cluster import events
from tartarus.cluster.db import connect
from tartarus.paths import REPO_ROOT
from tests.cluster.helpers import register, until
from tests.cluster.roles import Role

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "tartarus-cluster.json"
ALERTS = REPO_ROOT / "deploy" / "prometheus" / "cluster-alerts.yml"
METRIC = re.compile(r"\btartarus_[a-z0-9_]+")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(text: str) -> tuple[Samples, set[str]]:
    """Every sample by (name, labels), and every series name the exposition can hold (also of labelled
    families nothing has touched yet)."""
    samples: Samples = {}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",)}
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
            names.add(s.name)
    return samples, names


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    rules = yaml.safe_load(ALERTS.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]] + [
        r["expr"] for g in rules["groups"] for r in g["rules"]
    ]


@pytest.mark.vm
def test_roles_export_cluster_metrics_and_audit_every_decision(
    postgres_server_url: str, tmp_path: Path
) -> None:
    from tests.pg import fresh_database

    url = fresh_database(postgres_server_url, "metrics_" + secrets.token_hex(4))
    token = secrets.token_hex(32)
    roles: list[Role] = []
    try:
        agent = Role(tmp_path, "agent", "node-m", url, token, "--lease", "3", "--slots", "2")
        roles.append(agent)
        with connect(url) as conn:
            register(conn, "node-ghost", lease_s=1)  # no agent: it never renews
        gateway = Role(tmp_path, "gateway", "gw-m", url, token, "--grace", "1")
        roles.append(gateway)
        key = (agent.state / "admin.key").read_text().strip()

        for role in roles:  # scrapes need an admin key (the agent token alone is not one)
            assert httpx.get(f"{role.url}/metrics").status_code == 401
            bearer = {"Authorization": f"Bearer {secrets.token_hex(32)}"}
            assert httpx.get(f"{role.url}/metrics", headers=bearer).status_code == 401

        with httpx.Client(
            base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        ) as gw:
            user = gw.post("/v1/keys", json={"tenant": "acme"})
            assert user.status_code == 201, user.text
            for role in roles:  # nor a tenant's key: the metrics count every tenant's sandboxes
                bearer = {"Authorization": f"Bearer {user.json()['key']}"}
                assert httpx.get(f"{role.url}/metrics", headers=bearer).status_code == 403
            created = gw.post("/v1/sandboxes", json={"template": "python-ds"})
            assert created.status_code == 201, created.text
            sandbox_id = created.json()["id"]
            assert gw.get(f"/v1/sandboxes/{sandbox_id}").status_code == 200
            assert gw.get("/v1/sandboxes/sb-none").status_code == 404
            lost = 'tartarus_cluster_nodes{admin="active",state="lost"} 1.0'
            assert until(lambda: lost in gw.get("/metrics").text, timeout=30), gw.get("/metrics").text
            at_gateway, gateway_names = _samples(gw.get("/metrics").text)
            assert gw.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204
        at_agent, agent_names = _samples(
            httpx.get(f"{agent.url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
        )
    finally:
        for role in reversed(roles):
            role.stop()

    g = at_gateway
    assert _value(g, "tartarus_placement_seconds_count", outcome="reserved") == 1
    assert (
        _value(g, "tartarus_gateway_requests_total", method="POST", route="/v1/sandboxes", status="201") == 1
    )
    by_id = "/v1/sandboxes/{sandbox_id}"
    assert _value(g, "tartarus_gateway_requests_total", method="GET", route=by_id, status="200") == 1
    assert _value(g, "tartarus_gateway_requests_total", method="GET", route=by_id, status="404") == 1
    assert (
        _value(g, "tartarus_gateway_request_duration_seconds_count", method="POST", route="/v1/sandboxes")
        == 1
    )
    assert _value(g, "tartarus_cluster_nodes", state="up", admin="active") == 1
    assert _value(g, "tartarus_cluster_node_sandboxes", node="node-m") == 1
    assert _value(g, "tartarus_cluster_node_slots", node="node-m") == 2
    assert _value(g, "tartarus_gateway_reconciler_leader") == 1
    assert _value(g, "tartarus_cluster_nodes_lost_total") == 1

    a = at_agent
    assert _value(a, "tartarus_node_lease_renewals_total") >= 1
    assert _value(a, "tartarus_node_lease_held") == 1
    assert _value(a, "tartarus_node_epoch") == 1
    restores = [
        v
        for (n, ls), v in a.items()
        if n == "tartarus_sandbox_create_seconds_count" and ("method", "restore") in ls
    ]
    assert sum(restores) == 1  # the daemon's own (labelled by the backend this host runs)

    for query in _queries():
        used = set(METRIC.findall(query))
        assert used, f"query names no tartarus metric: {query}"
        assert used <= gateway_names | agent_names, f"{query}: {sorted(used - gateway_names - agent_names)}"

    # The audit trail: the placement (reserved under a provisional id, placed under the agent's), the
    # node given up, the sandbox's end.
    with connect(url) as conn:
        trail = [(e.kind, e.node, e.sandbox_id, e.detail) for e in reversed(events.recent(conn))]
    kinds = [(kind, node, sid) for kind, node, sid, _ in trail]
    placed = [t for t in trail if t[0] == "placed"]
    assert len(placed) == 1 and placed[0][1:3] == ("node-m", sandbox_id), trail
    provisional = placed[0][3].removeprefix("reserved as ")
    assert kinds.index(("reserved", "node-m", provisional)) < kinds.index(("placed", "node-m", sandbox_id))
    assert ("node_lost", "node-ghost", None) in kinds
    assert ("ended", "node-m", sandbox_id) in kinds
