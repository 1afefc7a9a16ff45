"""What was asked for a sandbox (`SandboxSpec`) and what admission made of it (`Admission`).

Both are frozen: the API converts its body to a spec once, at the boundary, and every layer below reads
it; a change (a fork's extra env, the daemon's defaults) is a new spec made with `dataclasses.replace`.
The spec is written down, versioned, wherever a sandbox must be admitted again later (the takeover
descriptor, the hibernation and checkpoint records); records written before it existed still load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from tartarus.limits.spec import Limits
from tartarus.network.policy import NetworkPolicy, PinnedPolicy
from tartarus.sandbox.backend import Backend, parse_backend

SPEC_VERSION = 2  # 1: the untyped `options` / `record` / `request` dicts of rev b43bebb and before
BOOT_TIMEOUT_S = 60.0


def _frozen(mapping: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class SandboxSpec:
    """A create request, whichever way it came (API body, fork, checkpoint, the template build)."""

    template: str
    vcpus: int | None = None  # None: the template's
    memory_mib: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    network: NetworkPolicy = field(default_factory=NetworkPolicy)  # a pydantic model: never mutated
    labels: Mapping[str, str] = field(default_factory=dict)
    tenant: str = "default"
    ttl_s: float | None = None  # requested lifetime (None: the policy's default)
    idle_timeout: float | None = None  # hibernate after this many idle seconds
    disk_mib: int | None = None  # requested writable-layer size; None: the template's layer as it is
    max_processes: int | None = None
    boot_timeout: float = BOOT_TIMEOUT_S
    backend: Backend | None = None  # None: the template's, the daemon's, or the host's VM backend

    def __post_init__(self) -> None:
        object.__setattr__(self, "env", _frozen(self.env))
        object.__setattr__(self, "labels", _frozen(self.labels))

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON values (env in clear: a caller that writes it to disk seals it)."""
        return {
            "version": SPEC_VERSION,
            "template": self.template,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "env": dict(self.env),
            "network": self.network.model_dump(mode="json"),
            "labels": dict(self.labels),
            "tenant": self.tenant,
            "ttl_s": self.ttl_s,
            "idle_timeout": self.idle_timeout,
            "disk_mib": self.disk_mib,
            "max_processes": self.max_processes,
            "boot_timeout": self.boot_timeout,
            "backend": self.backend,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SandboxSpec:
        return cls(
            template=str(data["template"]),
            vcpus=data.get("vcpus"),
            memory_mib=data.get("memory_mib"),
            env=data.get("env") or {},
            network=NetworkPolicy.model_validate(data.get("network") or {}),
            labels=data.get("labels") or {},
            tenant=str(data.get("tenant") or "default"),
            ttl_s=data.get("ttl_s"),
            idle_timeout=data.get("idle_timeout"),
            disk_mib=data.get("disk_mib"),
            max_processes=data.get("max_processes"),
            boot_timeout=float(data.get("boot_timeout") or BOOT_TIMEOUT_S),
            backend=parse_backend(data["backend"], "a spec's backend") if data.get("backend") else None,
        )

    @classmethod
    def from_v1(
        cls, template: str, request: Mapping[str, Any], options: Mapping[str, Any] | None = None
    ) -> SandboxSpec:
        """A spec from the records of version 1: a descriptor's `options` and `record`, or a saved sandbox's
        `request` (owner and request) with its vCPUs, memory and env as `options`."""
        merged = {**(options or {}), **{k: v for k, v in request.items() if k != "network"}}
        merged["network"] = request.get("network") or (options or {}).get("network")
        return cls.from_json({**merged, "template": template})


Verdict = Literal["admit", "reject", "quarantine"]


@dataclass(frozen=True)
class Decision:
    """The policy's verdict on a spec (`tartarus.policy.engine`), why, and where it may run."""

    verdict: Verdict
    reason: str
    rule: str | None = None  # the rule that decided; None for the default or a built-in check
    node: str | None = None  # where it may run (None when rejected)

    @property
    def quarantined(self) -> bool:
        return self.verdict == "quarantine"


@dataclass(frozen=True)
class Admission:
    """A spec admitted (`tartarus.policy.admission.admit`): the verdict, the limits it resolved to and
    its network, pinned to addresses."""

    decision: Decision
    limits: Limits
    network: PinnedPolicy  # what it asked for (behind a closed gate while quarantined)

    @property
    def by(self) -> str:
        """Who a quarantine at admission is recorded as done by."""
        return "admission" + (f":{self.decision.rule}" if self.decision.rule else "")
