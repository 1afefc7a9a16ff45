"""Choosing a sandbox's backend (pure logic: the host's verdicts are stubbed): the precedence of the
create's, the template's and the daemon's choice, the refusals of what does not work here or what a
gVisor sandbox cannot honour yet, and policy rules that match on the backend."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tartarus.daemon.config import DaemonConfig
from tartarus.errors import BackendUnavailable, InvalidArgument
from tartarus.gvisor.runsc import Support
from tartarus.limits.spec import Limits
from tartarus.network.policy import NONE, NetworkPolicy, PinnedPolicy
from tartarus.policy import PolicyEngine
from tartarus.policy.engine import AdmissionRequest
from tartarus.policy.model import Match, Policy, Rule
from tartarus.sandbox import choice
from tartarus.sandbox.backend import parse_backend
from tartarus.sandbox.spec import Admission, Decision, SandboxSpec, Verdict
from tartarus.templates.built import Template

TEMPLATE = Template(name="python-ds", key="k1", rootfs=Path("/nonexistent/rootfs.img"), fstype="ext4")


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """A TCG host where gVisor works and templates name no backend; tests change the entries."""
    verdict: dict[str, object] = {
        "vm": "tcg",
        "gvisor": Support(True, "runsc 0.0~20240729.0"),
        "template": None,
    }
    monkeypatch.setattr(choice, "vm_backend", lambda: verdict["vm"])
    monkeypatch.setattr(choice, "gvisor_support", lambda: verdict["gvisor"])
    monkeypatch.setattr(choice, "template_backend", lambda name, key: verdict["template"])
    return verdict


def test_the_create_wins_then_the_template_then_the_daemon_then_the_hosts_vm(host: dict[str, object]) -> None:
    assert choice.choose(None, TEMPLATE, None) == "tcg"
    assert choice.choose(None, TEMPLATE, "gvisor") == "gvisor"
    host["template"] = "tcg"
    assert choice.choose(None, TEMPLATE, "gvisor") == "tcg"
    assert choice.choose("gvisor", TEMPLATE, None) == "gvisor"


def test_a_backend_that_does_not_work_here_is_unavailable_with_the_reason(host: dict[str, object]) -> None:
    host["gvisor"] = Support(False, "runsc is not installed")
    with pytest.raises(BackendUnavailable, match="runsc is not installed") as raised:
        choice.choose("gvisor", TEMPLATE, None)
    assert raised.value.status == 503
    with pytest.raises(BackendUnavailable, match="runs VMs under tcg"):
        choice.choose("kvm", TEMPLATE, None)
    host["vm"] = "kvm"
    assert choice.choose("kvm", TEMPLATE, None) == "kvm"
    with pytest.raises(BackendUnavailable, match="under kvm"):
        choice.choose("tcg", TEMPLATE, None)


def test_backend_names_are_checked_where_they_come_in(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_backend("gvisor", "x") == "gvisor"
    with pytest.raises(InvalidArgument, match="kvm, tcg, gvisor"):
        parse_backend("firecracker", "x")
    monkeypatch.setenv("TARTARUS_BACKEND", "gVisor")
    assert DaemonConfig().backend == "gvisor"
    monkeypatch.setenv("TARTARUS_BACKEND", "auto")
    assert DaemonConfig().backend is None
    monkeypatch.setenv("TARTARUS_BACKEND", "qemu")
    with pytest.raises(InvalidArgument, match="TARTARUS_BACKEND"):
        DaemonConfig()


def test_the_requested_backend_survives_the_spec_records() -> None:
    spec = SandboxSpec("python-ds", backend="gvisor")
    assert SandboxSpec.from_json(spec.to_json()) == spec
    assert SandboxSpec.from_json(SandboxSpec("python-ds").to_json()).backend is None


def test_a_policy_rule_keeps_matching_tenants_off_gvisor_only() -> None:
    rule = Rule(name="vm-only", match=Match(tenant=["free-*"], backend=["gvisor"]), verdict="reject")
    engine = PolicyEngine(Policy(rules=[rule]))

    def verdict(tenant: str, backend: str | None) -> str:
        return engine.admit(AdmissionRequest(tenant, "python-ds", "none", backend=backend)).verdict

    assert verdict("free-1", "gvisor") == "reject"
    assert verdict("free-1", "tcg") == "admit"
    assert verdict("paid-1", "gvisor") == "admit"


def _admission(verdict: Verdict = "admit", network: PinnedPolicy = NONE) -> Admission:
    limits = Limits(vcpus=1, memory_mib=512, disk_mib=1024, max_processes=None, ttl_s=None)
    return Admission(Decision(verdict, "a rule"), limits, network)


def test_what_a_gvisor_sandbox_cannot_honour_yet_is_refused() -> None:
    spec = SandboxSpec("python-ds")
    choice.refuse_on_gvisor(TEMPLATE, spec, _admission())  # the plain case passes
    # What its network namespace and cgroups enforce now passes: a quarantine verdict, egress, vCPUs, memory.
    choice.refuse_on_gvisor(TEMPLATE, spec, _admission("quarantine"))
    full = SandboxSpec("python-ds", network=NetworkPolicy(mode="full"))
    choice.refuse_on_gvisor(TEMPLATE, full, _admission(network=PinnedPolicy("full")))
    choice.refuse_on_gvisor(TEMPLATE, SandboxSpec("python-ds", vcpus=2, memory_mib=256), _admission())
    with pytest.raises(InvalidArgument, match="does not enforce max_processes, disk_mib yet"):
        spec_ = SandboxSpec("python-ds", vcpus=2, max_processes=64, disk_mib=8192)
        choice.refuse_on_gvisor(TEMPLATE, spec_, _admission())
    shaped = Limits(vcpus=1, memory_mib=512, disk_mib=1024, max_processes=None, ttl_s=None,
                    egress_bytes_per_s=1 << 20, ingress_bytes_per_s=1 << 20)  # fmt: skip
    choice.refuse_on_gvisor(TEMPLATE, spec, Admission(Decision("admit", "a rule"), shaped, NONE))
    throttled = dataclasses.replace(shaped, disk_bytes_per_s=1 << 20)
    with pytest.raises(InvalidArgument, match="does not enforce the policy's disk bandwidth limits yet"):
        choice.refuse_on_gvisor(TEMPLATE, spec, Admission(Decision("admit", "a rule"), throttled, NONE))
    choice.refuse_on_gvisor(
        TEMPLATE, SandboxSpec("python-ds", idle_timeout=60), _admission()
    )  # it hibernates
    service = Template(name="svc", key="k", rootfs=Path("/x"), fstype="ext4", start=["nginx"])
    with pytest.raises(InvalidArgument, match="service"):
        choice.refuse_on_gvisor(service, spec, _admission())
