"""The Grafana dashboard and the Prometheus alert rules query only metrics a real daemon exports, and the
metrics of the four SLOs carry data once the daemon has done the work they time."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tartarus.paths import REPO_ROOT
from tests.api.conftest import Api

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "tartarus.json"
ALERTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
METRIC = re.compile(r"\btartarus_[a-z0-9_]+")


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def _alert_queries() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def _exported(metrics_text: str) -> set[str]:
    """Every series name the exposition can contain, also of families with no series yet (labelled ones
    nothing has touched): a histogram's _bucket/_sum/_count, a counter's name as its TYPE line gives it."""
    names: set[str] = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
            names |= {name + s for s in suffixes}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_query_names_an_exported_metric(api: Api) -> None:
    with api.client(api.admin_key) as c:
        exported = _exported(c.get("/metrics").text)
    queries = _dashboard_queries() + _alert_queries()
    assert len(queries) >= 12
    for query in queries:
        used = set(METRIC.findall(query))
        assert used, f"query names no tartarus metric: {query}"
        assert used <= exported, f"{query}: {sorted(used - exported)} not exported by the daemon"


def test_alert_rules_are_well_formed() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert set(rule) >= {"alert", "expr", "labels", "annotations"}, rule
            assert rule["labels"]["severity"] in ("info", "warning", "critical")
            assert re.fullmatch(r"\d+[smh]", rule.get("for", "0m")), rule


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def _observations(metrics_text: str, name: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(name + "_count"):
            return float(line.rsplit(maxsplit=1)[1])
    return 0.0


@pytest.mark.vm
def test_slo_histograms_fill_from_real_work(api: Api) -> None:
    from tartarus.sdk import Sandbox

    key = api.new_key("slo")
    with Sandbox.create("python-ds", url=api.url, api_key=key) as sb:
        sb.hibernate()
        assert sb.run_code("1+1").result == "2"  # wakes it
    with api.client(api.admin_key) as c:
        text = c.get("/metrics").text
    for name in ("tartarus_admission_seconds", "tartarus_hibernate_seconds", "tartarus_wake_seconds"):
        assert _observations(text, name) >= 1, name
    assert 'tartarus_sandbox_create_seconds_count{backend="tcg",method="restore"}' in text
