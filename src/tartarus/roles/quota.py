"""A tenant's quota over the whole cluster, checked by the gateway before it places a create.

Each agent applies the tenant's quota to what it runs itself; only the gateway sees every node. A
tenant with limits has its creates serialised cluster-wide by a PostgreSQL session advisory lock (any
gateway, any thread), held from the count until the placement is confirmed: the agent stores the new
sandbox's record before it answers, so the next create of that tenant counts it. A gateway that dies
holding the lock loses its session, and the lock with it. Tenants without limits take no lock.

Counted: the tenant's live records in the shared store whose placement the cluster still holds (a
sandbox lost with its node no longer counts); hibernated ones count as sandboxes, not as vCPUs or memory,
as on a single host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from tartarus.cluster.db import Connection
from tartarus.cluster.model import Demand
from tartarus.daemon import quotas
from tartarus.store import SandboxRow, Tenant

_NAMESPACE = (
    7464  # the first int4 of the two-key advisory lock: per-tenant create admission (7463: elections)
)


def limits_of(tenant: Tenant | None) -> quotas.Limits | None:
    """The tenant's limits on creates, or None when it has none (no lock, no count)."""
    if tenant is None:
        return None
    limits = quotas.Limits(tenant.max_sandboxes, tenant.max_vcpus, tenant.max_memory_mib)
    if limits.max_sandboxes is None and limits.max_vcpus is None and limits.max_memory_mib is None:
        return None
    return limits


@contextlib.contextmanager
def admitted(
    conn: Connection,
    tenant: str,
    limits: quotas.Limits,
    demand: Demand,
    live_records: Callable[[], list[SandboxRow]],
) -> Iterator[None]:
    """Hold the tenant's admission lock for the block, once `demand` fits its quota; QuotaExceeded (429)
    naming the limit otherwise."""
    key = ("tenant:" + tenant,)
    conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (_NAMESPACE, *key))
    try:
        rows = live_records()
        held = {
            str(r[0])
            for r in conn.execute(
                "SELECT sandbox_id FROM cluster.placements WHERE sandbox_id = ANY(%s) AND state <> 'lost'",
                ([r.id for r in rows],),
            )
        }
        counted = [r for r in rows if r.id in held]
        running = [r for r in counted if r.state != "hibernated"]
        usage = quotas.Usage(len(counted), sum(r.vcpus for r in running), sum(r.memory_mib for r in running))
        quotas.check(tenant, limits, usage, quotas.Usage(1, demand.vcpus, demand.memory_mib))
        yield
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (_NAMESPACE, *key))
