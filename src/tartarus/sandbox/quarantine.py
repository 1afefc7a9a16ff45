"""What a sandbox records while quarantined (`Sandbox.quarantine`): kept apart so that its descriptor
can read and write it without the sandbox's own module."""

from __future__ import annotations

from dataclasses import dataclass, field

from tartarus.limits.bandwidth import Bandwidth
from tartarus.limits.spec import Limits


@dataclass
class QuarantineState:
    since: float
    reason: str
    by: str  # "admission[:rule]", "operator:<key id>@<tenant>", "trigger:<what>"
    limits: Limits | None  # restored on release


@dataclass(frozen=True)
class Confinement:
    """What a quarantine clamps a sandbox to (the policy's `quarantine:` settings, as plain values)."""

    cpu_fraction: float
    memory_mib: int
    bandwidth: Bandwidth = field(default_factory=Bandwidth)  # disk only: its network is cut altogether
