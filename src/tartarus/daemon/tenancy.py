"""Tenant quotas at admission: what a tenant's sandboxes hold now (from the manager's table), and
`wanted` checked against its quota and reserved until the new sandboxes count as usage
(`quotas.Reservations`), for creates, forks, copies, wakes and checkpoints alike."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from starlette.requests import Request

from tartarus.daemon import quotas
from tartarus.daemon.auth import Principal
from tartarus.daemon.manager import SandboxManager
from tartarus.daemon.metrics import Metrics
from tartarus.daemon.table import SandboxRecord
from tartarus.errors import QuotaExceeded
from tartarus.store import Tenant


def _principal(request: Request) -> Principal:
    principal = request.state.principal
    assert isinstance(principal, Principal)  # the gate resolved it before any route runs
    return principal


class TenantQuotas:
    def __init__(
        self,
        manager: SandboxManager,
        metrics: Metrics,
        tenant_row: Callable[[str], Awaitable[Tenant | None]],
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self._tenant_row = tenant_row
        self._reservations = quotas.Reservations()

    def checkpoints_of(self, tenant: str) -> int:
        """How many checkpoints a tenant keeps on this daemon (they hold a guest's RAM and disk)."""
        return sum(1 for saved in self.manager.checkpoints() if saved.spec.tenant == tenant)

    def usage(self, tenant: str) -> quotas.Usage:
        """What a tenant's sandboxes on this daemon hold now: a failed one nothing, one without a VM
        (hibernated) its place among the tenant's sandboxes but no vCPUs or memory."""
        used = quotas.Usage()
        for record in self.manager.list():
            if record.tenant != tenant or record.state == "failed":
                continue
            running = record.runtime is not None and record.state == "running"
            used = used + quotas.Usage(1, record.vcpus if running else 0, record.memory_mib if running else 0)
        return used

    @contextlib.contextmanager
    def admission(self, request: Request, wanted: quotas.Usage) -> Iterator[None]:
        """Check `wanted` against the caller's tenant quota and hold it until the block ends (by then the
        new sandboxes are adopted and counted as usage). Raises QuotaExceeded."""
        with self._hold(_principal(request).tenant, getattr(request.state, "tenant", None), wanted):
            yield

    @contextlib.asynccontextmanager
    async def admitted(self, tenant: str, wanted: quotas.Usage) -> AsyncIterator[None]:
        """`admission` for a tenant other than the caller's (the owner of a sandbox being woken or
        captured), its quota read from the store now."""
        row = await self._tenant_row(tenant)
        with self._hold(tenant, row, wanted):
            yield

    def admit_wake(self, record: SandboxRecord) -> contextlib.AbstractAsyncContextManager[None]:
        """The manager's hook around a wake: the owner's quota must have room for the sandbox's vCPUs and
        memory again (it already counts among the tenant's sandboxes). Raises QuotaExceeded."""
        saved = record.saved
        assert saved is not None
        wanted = quotas.Usage(0, saved.vcpus, saved.memory_mib)
        return self.admitted(record.tenant, wanted)

    @contextlib.contextmanager
    def _hold(self, tenant: str, row: Tenant | None, wanted: quotas.Usage) -> Iterator[None]:
        limits = (
            quotas.Limits(row.max_sandboxes, row.max_vcpus, row.max_memory_mib, row.max_checkpoints)
            if row
            else quotas.Limits()
        )
        # No await between the check and the reservation: concurrent requests see each other.
        try:
            in_use = self.usage(tenant) + self._reservations.pending(tenant)
            if wanted.checkpoints:  # read from disk: only when asked for
                in_use = in_use + quotas.Usage(checkpoints=self.checkpoints_of(tenant))
            quotas.check(tenant, limits, in_use, wanted)
        except QuotaExceeded:
            self.metrics.quota_rejections.labels(tenant).inc()
            raise
        with self._reservations.hold(tenant, wanted):
            yield
