"""Per-tenant numeric quotas (concurrent sandboxes, vCPUs, memory, checkpoints), enforced at admission.

Admission checks usage *plus* requests still in flight, and reserves the request before the first await,
so concurrent creates, wakes and checkpoints on one event loop cannot overshoot a limit together.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from tartarus.errors import QuotaExceeded


@dataclass(frozen=True)
class Usage:
    sandboxes: int = 0
    vcpus: int = 0
    memory_mib: int = 0
    checkpoints: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(**{name: getattr(self, name) + getattr(other, name) for name in _FIELDS})


_FIELDS = tuple(f.name for f in dataclasses.fields(Usage))


@dataclass(frozen=True)
class Limits:
    """None means unlimited."""

    max_sandboxes: int | None = None
    max_vcpus: int | None = None
    max_memory_mib: int | None = None
    max_checkpoints: int | None = None


def check(tenant: str, limits: Limits, usage: Usage, request: Usage) -> None:
    """Raise QuotaExceeded naming the first limit that `usage + request` would break. A request for none
    of a resource is never refused on it (a wake adds no sandbox, even to a tenant over a lowered limit)."""
    for name, limit, used, wanted, unit in (
        ("max_sandboxes", limits.max_sandboxes, usage.sandboxes, request.sandboxes, "sandboxes"),
        ("max_vcpus", limits.max_vcpus, usage.vcpus, request.vcpus, "vCPUs"),
        ("max_memory_mib", limits.max_memory_mib, usage.memory_mib, request.memory_mib, "MiB"),
        ("max_checkpoints", limits.max_checkpoints, usage.checkpoints, request.checkpoints, "checkpoints"),
    ):
        if limit is not None and wanted > 0 and used + wanted > limit:
            raise QuotaExceeded(
                f"tenant {tenant!r} quota {name}={limit} exceeded: {used} {unit} in use + {wanted} requested"
            )


class Reservations:
    """Requests admitted but not yet finished, per tenant (they count against the quota)."""

    def __init__(self) -> None:
        self._pending: dict[str, Counter[str]] = {}

    def pending(self, tenant: str) -> Usage:
        c = self._pending.get(tenant, Counter())
        return Usage(**{name: c[name] for name in _FIELDS})

    @contextlib.contextmanager
    def hold(self, tenant: str, request: Usage) -> Iterator[None]:
        amounts = Counter(dataclasses.asdict(request))
        self._pending.setdefault(tenant, Counter()).update(amounts)
        try:
            yield
        finally:
            counter = self._pending[tenant]
            counter.subtract(amounts)
            if not +counter:
                del self._pending[tenant]
