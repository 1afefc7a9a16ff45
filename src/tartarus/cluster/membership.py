"""Node membership: register with an epoch, renew a lease on the database's clock, cordon and drain.

An epoch is the fencing token. Each registration takes a new one, and every write a node makes (renewal,
confirming a placement) names it, so a node that was partitioned long enough to be replaced, or whose
lease simply lapsed, is refused rather than allowed to act on a stale view. A refused node must stop
taking work, reconcile what it runs (`Registration.kill`) and register again.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from tartarus.cluster import events
from tartarus.cluster.db import Connection, reports_outages
from tartarus.cluster.errors import Fenced, UnknownNode
from tartarus.cluster.model import (
    Admin,
    Lease,
    NodeSpec,
    NodeState,
    NodeView,
    PlacementState,
    Registration,
    Resources,
    check_name,
)
from tartarus.cluster.usage import USED_COLUMNS, USED_CTE, USED_JOIN
from tartarus.errors import InvalidArgument

DEFAULT_LEASE_S = 10.0  # an agent renews every lease/3 seconds, so two missed renewals still hold it


class Membership:
    """Membership operations on one connection (an agent's lease loop, or a gateway's admin calls)."""

    def __init__(self, conn: Connection, *, lease_s: float = DEFAULT_LEASE_S) -> None:
        if lease_s <= 0:
            raise InvalidArgument("the lease must be positive")
        self.conn = conn
        self.lease_s = lease_s

    @reports_outages
    def register(self, spec: NodeSpec, running: Iterable[str] = ()) -> Registration:
        """Join (or rejoin) with a new epoch; `running` is what the agent runs now, to reconcile against."""
        held = set(running)
        for sandbox_id in held:
            check_name("sandbox id", sandbox_id)
        c = spec.capacity
        with self.conn.transaction():
            row = self.conn.execute(
                """INSERT INTO cluster.nodes AS n (name, address, epoch, state, vcpus, memory_mib, disk_mib,
                       slots, labels, templates, lease_expires_at)
                   VALUES (%(name)s, %(address)s, 1, 'up', %(vcpus)s, %(mem)s, %(disk)s, %(slots)s,
                       %(labels)s, %(templates)s, now() + make_interval(secs => %(lease)s))
                   ON CONFLICT (name) DO UPDATE SET
                       address = EXCLUDED.address, epoch = n.epoch + 1, state = 'up',
                       vcpus = EXCLUDED.vcpus, memory_mib = EXCLUDED.memory_mib, disk_mib = EXCLUDED.disk_mib,
                       slots = EXCLUDED.slots, labels = EXCLUDED.labels, templates = EXCLUDED.templates,
                       registered_at = now(), lease_expires_at = EXCLUDED.lease_expires_at, lost_at = NULL
                   RETURNING epoch, lease_expires_at""",
                {
                    "name": spec.name,
                    "address": spec.address,
                    "vcpus": c.vcpus,
                    "mem": c.memory_mib,
                    "disk": c.disk_mib,
                    "slots": c.slots,
                    "labels": sorted(spec.labels),
                    "templates": sorted(spec.templates),
                    "lease": self.lease_s,
                },
            ).fetchone()
            assert row is not None
            epoch, expires = int(row[0]), row[1]
            placed = {
                str(r[0])
                for r in self.conn.execute(
                    "SELECT sandbox_id FROM cluster.placements WHERE node = %s AND state = 'running' "
                    "FOR UPDATE",
                    (spec.name,),
                )
            }
            adopted = sorted(placed & held)
            gone = sorted(placed - held)
            self.conn.execute(
                "UPDATE cluster.placements SET epoch = %s, updated_at = now() "
                "WHERE node = %s AND sandbox_id = ANY(%s)",
                (epoch, spec.name, adopted),
            )
            self.conn.execute(
                "UPDATE cluster.placements SET state = 'lost', updated_at = now() "
                "WHERE node = %s AND sandbox_id = ANY(%s)",
                (spec.name, gone),
            )
            events.record(
                self.conn,
                "registered",
                node=spec.name,
                epoch=epoch,
                detail=f"adopted={len(adopted)} kill={len(held - placed)} gone={len(gone)}",
            )
            for sandbox_id in gone:
                events.record(
                    self.conn,
                    "sandbox_lost",
                    node=spec.name,
                    epoch=epoch,
                    sandbox_id=sandbox_id,
                    detail="its node re-registered without it",
                )
        return Registration(
            lease=Lease(spec.name, epoch, expires),
            adopted=tuple(adopted),
            kill=tuple(sorted(held - placed)),
            gone=tuple(gone),
        )

    @reports_outages
    def renew(self, lease: Lease) -> Lease:
        """Extend the lease from the database's now(); Fenced when it lapsed or a newer epoch exists."""
        with self.conn.transaction():
            row = self.conn.execute(
                "UPDATE cluster.nodes SET lease_expires_at = now() + make_interval(secs => %s) "
                "WHERE name = %s AND epoch = %s AND state = 'up' AND lease_expires_at > now() "
                "RETURNING lease_expires_at",
                (self.lease_s, lease.node, lease.epoch),
            ).fetchone()
            if row is not None:
                return Lease(lease.node, lease.epoch, row[0])
            why = self._why_fenced(lease)
            events.record(self.conn, "fenced", node=lease.node, epoch=lease.epoch, detail=why)
        raise Fenced(
            f"node {lease.node} (epoch {lease.epoch}) is fenced: {why}; stop, reconcile, re-register"
        )

    def _why_fenced(self, lease: Lease) -> str:
        row = self.conn.execute(
            "SELECT epoch, state, lease_expires_at FROM cluster.nodes WHERE name = %s",
            (lease.node,),
        ).fetchone()
        if row is None:
            return "it is not registered"
        if int(row[0]) != lease.epoch:
            return f"epoch {row[0]} replaced it"
        if row[1] == NodeState.LOST:
            return "it was marked lost"
        return f"its lease lapsed at {row[2].isoformat()}"

    @reports_outages
    def set_admin(self, name: str, admin: Admin) -> None:
        """Cordon (no new placements), drain (no new placements; hibernate its sandboxes) or reactivate."""
        with self.conn.transaction():
            changed = self.conn.execute(
                "UPDATE cluster.nodes SET admin = %s WHERE name = %s", (admin.value, name)
            ).rowcount
            if not changed:
                raise UnknownNode(f"no node named {name!r}")
            events.record(self.conn, admin.value, node=name)

    @reports_outages
    def drain(self, name: str) -> tuple[str, ...]:
        """Mark the node draining; returns the sandboxes running there, which the caller hibernates."""
        self.set_admin(name, Admin.DRAINING)
        rows = self.conn.execute(
            "SELECT sandbox_id FROM cluster.placements WHERE node = %s AND state = %s ORDER BY sandbox_id",
            (name, PlacementState.RUNNING.value),
        ).fetchall()
        return tuple(str(r[0]) for r in rows)

    @reports_outages
    def nodes(self) -> list[NodeView]:
        rows = self.conn.execute(
            f"""{USED_CTE}
                SELECT n.name, n.address, n.epoch, n.state, n.admin, n.vcpus, n.memory_mib, n.disk_mib,
                       n.slots, n.labels, n.templates, n.lease_expires_at,
                       n.state = 'up' AND n.lease_expires_at > now(), {USED_COLUMNS}
                FROM cluster.nodes n {USED_JOIN} ORDER BY n.name"""
        ).fetchall()
        return [_view(r) for r in rows]

    def node(self, name: str) -> NodeView:
        for view in self.nodes():
            if view.name == name:
                return view
        raise UnknownNode(f"no node named {name!r}")


def _view(r: tuple[Any, ...]) -> NodeView:
    expires: datetime = r[11]
    return NodeView(
        name=r[0],
        address=r[1],
        epoch=int(r[2]),
        state=NodeState(r[3]),
        admin=Admin(r[4]),
        capacity=Resources(int(r[5]), int(r[6]), int(r[7]), int(r[8])),
        labels=frozenset(r[9]),
        templates=frozenset(r[10]),
        lease_expires_at=expires,
        healthy=bool(r[12]),
        used=Resources(int(r[13]), int(r[14]), int(r[15]), int(r[16])),
    )
