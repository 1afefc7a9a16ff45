"""The admission policy: file validation with clear errors, rule matching, verdicts and placement."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from tartarus.errors import InvalidArgument, PolicyDenied
from tartarus.network.policy import NetworkPolicy
from tartarus.policy import AdmissionRequest, PolicyEngine, load_policy
from tartarus.policy.admission import admit
from tartarus.policy.model import Match, Node, Placement, Policy, Rule
from tartarus.sandbox.spec import SandboxSpec
from tartarus.templates.built import Template

POLICY = """
limits: {max_vcpus: 2, max_ttl_s: 600}
network: {modes: [none, allow]}
rules:
  - name: miners
    match: {labels: {job: miner}}
    verdict: reject
    reason: no mining
  - name: free-tier
    match: {tenant: ["free-*"], template: [python-*]}
    verdict: quarantine
    reason: free tier is confined
  - name: images
    match: {image: ["registry.internal/*"]}
    verdict: admit
quarantine: {cpu_fraction: 0.05, memory_mib: 128}
"""


def request(**kw: object) -> AdmissionRequest:
    base: dict[str, object] = {"tenant": "acme", "template": "python-ds", "network": "none"}
    return AdmissionRequest(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture
def engine(tmp_path: Path) -> PolicyEngine:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return PolicyEngine(load_policy(path))


def test_first_matching_rule_decides(engine: PolicyEngine) -> None:
    assert engine.admit(request()).verdict == "admit"
    d = engine.admit(request(tenant="free-42"))
    assert (d.verdict, d.reason, d.rule, d.node) == (
        "quarantine",
        "free tier is confined",
        "free-tier",
        "local",
    )
    d = engine.admit(request(tenant="free-42", labels={"job": "miner"}))
    assert (d.verdict, d.rule) == ("reject", "miners")
    assert engine.admit(request(tenant="free-1", template="node")).verdict == "admit"


def test_network_modes_not_allowed_are_rejected(engine: PolicyEngine) -> None:
    d = engine.admit(request(network="full"))
    assert d.verdict == "reject" and "'full' is not allowed" in d.reason


def test_image_rules_need_an_image(engine: PolicyEngine) -> None:
    assert engine.admit(request(image="registry.internal/x:1")).rule == "images"
    assert engine.admit(request(image=None)).rule is None


def test_quarantine_needs_quarantine_capacity() -> None:
    policy = Policy(
        rules=[Rule(name="all", match=Match(), verdict="quarantine")],
        placement=Placement(nodes=[Node(name="a", labels=["general"])]),
    )
    d = PolicyEngine(policy).admit(request())
    assert d.verdict == "reject" and "no quarantine capacity" in d.reason


def test_quarantine_placement_uses_labelled_nodes() -> None:
    policy = Policy(
        rules=[Rule(name="all", match=Match(tenant=["bad"]), verdict="quarantine")],
        placement=Placement(
            nodes=[Node(name="a", labels=["general"]), Node(name="q", labels=["quarantine"])]
        ),
    )
    assert PolicyEngine(policy).admit(request(tenant="bad")).node == "q"
    assert PolicyEngine(policy).admit(request()).node == "a"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("rules: [{name: x, verdict: maybe}]", "rules.0.verdict"),
        ("rules: [{name: x, verdict: admit, match: {colour: red}}]", "rules.0.match.colour"),
        ("limits: {max_vcpus: 0}", "limits.max_vcpus"),
        ("network: {modes: [wide]}", "network.modes.0"),
        ("rules: [{name: a, verdict: admit}, {name: a, verdict: reject}]", "used twice"),
        ("surprise: 1", "surprise"),
        ("rules: [unclosed", "cannot read policy"),
    ],
)
def test_invalid_policy_files_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(InvalidArgument) as info:
        load_policy(path)
    assert str(path) in info.value.message and field in info.value.message


def test_empty_file_is_the_default_policy(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("")
    assert load_policy(path) == Policy()


def test_this_node_is_preferred_when_it_qualifies() -> None:
    policy = Policy(
        placement=Placement(
            local="b", nodes=[Node(name="a", labels=["general"]), Node(name="b", labels=["general"])]
        )
    )
    assert PolicyEngine(policy).admit(request()).node == "b"


def test_quarantine_is_refused_on_a_node_without_quarantine_capacity() -> None:
    policy = Policy(
        rules=[Rule(name="bad", match=Match(tenant=["bad"]), verdict="quarantine", reason="bad tenant")],
        placement=Placement(
            local="a", nodes=[Node(name="a", labels=["general"]), Node(name="q", labels=["quarantine"])]
        ),
    )
    engine = PolicyEngine(policy)
    template = Template("python-ds", "k", Path("/nonexistent"), "ext4", vcpus=1, memory_mib=512)
    req = SandboxSpec("python-ds", tenant="bad", network=NetworkPolicy())
    with pytest.raises(
        PolicyDenied, match=r"needs quarantine capacity, which this node \('a'\) does not have"
    ):
        asyncio.run(admit(engine, template, req))
    ok = asyncio.run(admit(engine, template, dataclasses.replace(req, tenant="good")))
    assert ok.decision.verdict == "admit" and ok.decision.node == "a"


def test_the_documented_policy_file_is_valid(tmp_path: Path) -> None:
    """docs/security.md shows a policy file: it must stay one that loads."""
    import re

    from tartarus.paths import REPO_ROOT

    text = (REPO_ROOT / "docs" / "security.md").read_text()
    match = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert match is not None
    path = tmp_path / "policy.yaml"
    path.write_text(match.group(1))
    policy = load_policy(path)
    assert [r.verdict for r in policy.rules] == ["reject", "quarantine", "quarantine"]
