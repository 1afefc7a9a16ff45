"""The typed values passed between the cluster modules and to the roles that use them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from tartarus.errors import InvalidArgument

QUARANTINE = "quarantine"  # the label that marks a node as quarantine capacity
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def check_name(kind: str, value: str) -> str:
    """Node names, labels and sandbox ids end up in SQL parameters, object keys and logs: keep them plain."""
    if not _NAME.match(value):
        raise InvalidArgument(
            f"{kind} must be 1-63 characters of letters, digits, '.', '_' or '-': {value!r}"
        )
    return value


class NodeState(StrEnum):
    UP = "up"  # registered; healthy while its lease is unexpired
    LOST = "lost"  # its lease lapsed past the grace period: the cluster gave up on its running sandboxes


class Admin(StrEnum):
    """What an operator allows: only `active` nodes take new placements."""

    ACTIVE = "active"
    CORDONED = "cordoned"  # keeps its sandboxes, takes no new ones
    DRAINING = "draining"  # takes no new ones; its sandboxes are to be hibernated so they wake elsewhere


class PlacementState(StrEnum):
    RESERVED = "reserved"  # capacity held while the gateway calls the agent; expires on its own
    RUNNING = "running"  # the agent confirmed it runs the sandbox
    HIBERNATED = "hibernated"  # state in the object store; holds no capacity, wakes on any node
    LOST = "lost"  # its node was lost while it ran: never resumed, never served twice


@dataclass(frozen=True)
class Resources:
    """An amount of the four things a node has: vCPUs, memory, disk and sandbox slots."""

    vcpus: int = 0
    memory_mib: int = 0
    disk_mib: int = 0
    slots: int = 0

    def __post_init__(self) -> None:
        for name in ("vcpus", "memory_mib", "disk_mib", "slots"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} cannot be negative")

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.vcpus + other.vcpus,
            self.memory_mib + other.memory_mib,
            self.disk_mib + other.disk_mib,
            self.slots + other.slots,
        )

    def covers(self, need: Resources) -> bool:
        return (
            need.vcpus <= self.vcpus
            and need.memory_mib <= self.memory_mib
            and need.disk_mib <= self.disk_mib
            and need.slots <= self.slots
        )


@dataclass(frozen=True)
class NodeSpec:
    """What an agent announces when it registers."""

    name: str
    address: str  # where gateways reach its agent API (host:port)
    capacity: Resources
    labels: frozenset[str] = frozenset()
    templates: frozenset[str] = frozenset()  # template snapshot keys held locally

    def __post_init__(self) -> None:
        check_name("node name", self.name)
        for label in self.labels:
            check_name("label", label)
        if not self.address or len(self.address) > 255:
            raise InvalidArgument("a node needs an address (host:port) of at most 255 characters")


@dataclass(frozen=True)
class Lease:
    """A node's right to take work until `expires_at` (the database's clock), under `epoch`."""

    node: str
    epoch: int
    expires_at: datetime


@dataclass(frozen=True)
class Registration:
    """The outcome of (re-)registering: the new lease and what the agent must do with what it runs."""

    lease: Lease
    adopted: tuple[str, ...]  # sandboxes it runs that are still placed on it: keep serving them
    kill: tuple[str, ...]  # sandboxes it runs that the cluster gave up on or placed elsewhere: kill them
    gone: tuple[str, ...]  # placed on it but it no longer runs them: now marked lost


@dataclass(frozen=True)
class NodeView:
    """A node as the cluster sees it now; `healthy` means up with an unexpired lease."""

    name: str
    address: str
    epoch: int
    state: NodeState
    admin: Admin
    capacity: Resources
    used: Resources
    labels: frozenset[str]
    templates: frozenset[str]
    lease_expires_at: datetime
    healthy: bool


@dataclass(frozen=True)
class Demand:
    """What a sandbox needs from a node; `origin` is the node it was hibernated on (a wake)."""

    sandbox_id: str
    vcpus: int
    memory_mib: int
    disk_mib: int
    template: str
    labels: frozenset[str] = frozenset()
    quarantine: bool = False
    origin: str | None = None

    def __post_init__(self) -> None:
        check_name("sandbox id", self.sandbox_id)
        if self.vcpus < 1 or self.memory_mib < 1 or self.disk_mib < 0:
            raise InvalidArgument("a sandbox needs at least 1 vCPU and 1 MiB of memory")

    @property
    def resources(self) -> Resources:
        return Resources(self.vcpus, self.memory_mib, self.disk_mib, 1)

    @property
    def required_labels(self) -> frozenset[str]:
        return self.labels | {QUARANTINE} if self.quarantine else self.labels


@dataclass(frozen=True)
class Reservation:
    """Capacity held on `node` for a sandbox until `expires_at` unless confirmed or released first."""

    sandbox_id: str
    node: str
    address: str
    epoch: int
    expires_at: datetime
    score: float
    wake: bool = False  # a hibernated sandbox's placement: released, it goes back to hibernated


@dataclass(frozen=True)
class LostNode:
    name: str
    epoch: int
    sandboxes: tuple[str, ...]  # its running or reserved sandboxes, now lost


@dataclass(frozen=True)
class Sweep:
    """What one reconciler pass did."""

    lost: tuple[LostNode, ...] = ()
    reclaimed: tuple[str, ...] = ()  # expired reservations given back


@dataclass(frozen=True)
class Location:
    """Where a sandbox is, for routing a call to its agent."""

    sandbox_id: str
    node: str
    address: str
    epoch: int
    state: PlacementState
    node_healthy: bool = True  # its node is up with an unexpired lease
    capture: str | None = None  # hibernated in the object store as this capture: wakes on any node
    waking: bool = False  # a wake from the object store holds a reservation on `node` now

    @property
    def stored(self) -> bool:
        """Hibernated in the object store: a call must place a wake first."""
        return self.state == PlacementState.HIBERNATED and self.capture is not None
