"""The policy file (YAML), validated by pydantic: unknown keys and bad values are errors naming the field.

```yaml
limits: {max_vcpus: 4, max_memory_mib: 8192, max_ttl_s: 3600, default_ttl_s: 900}
network: {modes: [none, allow]}            # modes a request may ask for
bandwidth: {disk_bytes_per_s: 104857600, egress_bytes_per_s: 12500000}   # per sandbox; default: off
rules:                                     # first match wins; no match: admit
  - name: free-tier-full-network
    match: {tenant: ["free-*"], network: [full]}
    verdict: quarantine
    reason: free-tier sandboxes with full egress are confined
  - name: no-gvisor-for-free-tier                # gVisor's boundary is a user-space kernel, not a VM
    match: {tenant: ["free-*"], backend: [gvisor]}
    verdict: reject
    reason: free-tier sandboxes run in VMs
quarantine: {cpu_fraction: 0.1, memory_mib: 256, refused_packets: 500, window_s: 5, disk_bytes_per_s: 8388608}
placement:
  nodes: [{name: local, labels: [general, quarantine]}]
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tartarus.errors import InvalidArgument
from tartarus.limits.bandwidth import Bandwidth
from tartarus.limits.spec import LimitCaps

NetworkMode = Literal["none", "allow", "full"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(Strict):
    """All given fields must match (AND); a list matches if any entry does (OR). Globs (`*`, `?`)."""

    tenant: list[str] | None = None
    template: list[str] | None = None
    image: list[str] | None = None
    network: list[NetworkMode] | None = None
    backend: list[Literal["kvm", "tcg", "gvisor"]] | None = Field(
        None, description="the backend chosen for the sandbox (a `sandbox.backend.Backend`)"
    )
    labels: dict[str, str] = Field(default_factory=dict, description="each key must have this value")


class Rule(Strict):
    name: str = Field(min_length=1, max_length=128)
    match: Match = Field(default_factory=Match)
    verdict: Literal["admit", "reject", "quarantine"]
    reason: str = Field("", max_length=1024)


def _all_modes() -> list[NetworkMode]:
    return ["none", "allow", "full"]


class NetworkRules(Strict):
    modes: list[NetworkMode] = Field(default_factory=_all_modes, min_length=1)
    expose: bool = Field(True, description="whether guest ports may be exposed on the host (get_host)")
    expose_requires_token: bool = Field(
        False, description="every exposed port needs the sandbox's traffic token (HTTP/1.x only)"
    )
    # Each exposed port is a listener and each connection two sockets of the daemon: bounded, so that no
    # tenant can use up the daemon's file descriptors.
    max_exposed_ports_per_sandbox: int = Field(16, ge=0)
    max_exposed_ports_per_tenant: int = Field(64, ge=0)
    max_exposed_connections_per_sandbox: int = Field(64, ge=1, description="in progress at once")
    max_exposed_connections_per_tenant: int = Field(256, ge=1, description="in progress at once")


def _rate() -> Any:
    return Field(None, ge=64 << 10, description="bytes per second (None: unlimited)")


class BandwidthPolicy(Strict):
    """Every sandbox's bandwidth. Off by default (a host whose disk and uplink are not contended should
    not pay for a limit); docs/security.md gives recommended values for a shared host."""

    disk_bytes_per_s: int | None = _rate()
    disk_iops: int | None = Field(None, ge=10, description="read and write operations per second")
    egress_bytes_per_s: int | None = _rate()
    ingress_bytes_per_s: int | None = _rate()

    def resolved(self) -> Bandwidth:
        return Bandwidth(
            self.disk_bytes_per_s, self.disk_iops, self.egress_bytes_per_s, self.ingress_bytes_per_s
        )


class QuarantineSettings(Strict):
    cpu_fraction: float = Field(0.1, gt=0, le=64, description="of one CPU")
    memory_mib: int = Field(256, ge=64, description="memory may not grow past max(this, current use)")
    refused_packets: int | None = Field(
        500, ge=1, description="quarantine a sandbox whose policy drops this many packets (None: off)"
    )
    window_s: float = Field(5.0, gt=0, le=3600, description="...within this many seconds")
    # Disk only: a quarantined sandbox's network is cut altogether.
    disk_bytes_per_s: int | None = Field(8 << 20, ge=64 << 10, description="at most this (None: as before)")
    disk_iops: int | None = Field(200, ge=10, description="at most this (None: as before)")

    @property
    def bandwidth(self) -> Bandwidth:
        return Bandwidth(disk_bytes_per_s=self.disk_bytes_per_s, disk_iops=self.disk_iops)


class Node(Strict):
    name: str = Field(min_length=1, max_length=128)
    labels: list[str] = Field(default_factory=list)


class Placement(Strict):
    """Capacity: quarantined sandboxes go only to nodes with `quarantine_label`, others to nodes with
    `general_label`. `local` names this daemon's node: a decision that places a sandbox elsewhere is
    refused here (a control plane routes it to that node instead)."""

    local: str = "local"
    general_label: str = "general"
    quarantine_label: str = "quarantine"
    nodes: list[Node] = Field(
        default_factory=lambda: [Node(name="local", labels=["general", "quarantine"])], min_length=1
    )


class Policy(Strict):
    limits: LimitCaps = Field(default_factory=LimitCaps)
    network: NetworkRules = Field(default_factory=NetworkRules)
    bandwidth: BandwidthPolicy = Field(default_factory=BandwidthPolicy)
    rules: list[Rule] = Field(default_factory=list)
    quarantine: QuarantineSettings = Field(default_factory=QuarantineSettings)
    placement: Placement = Field(default_factory=Placement)

    @model_validator(mode="after")
    def _unique_rules(self) -> Policy:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"rule name {rule.name!r} is used twice")
            seen.add(rule.name)
        return self


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file; InvalidArgument names the file and each bad field."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise InvalidArgument(f"{path}: cannot read policy: {e}") from e
    try:
        return Policy.model_validate(raw or {})
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(top)'}: {err['msg']}" for err in e.errors())
        raise InvalidArgument(f"{path}: invalid policy: {errors}") from e
