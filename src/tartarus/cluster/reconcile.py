"""The reconciler's pass: give up on nodes whose lease lapsed past the grace period, reclaim reservations.

Run it only while holding the reconciler `Election` (one gateway at a time), though it stays correct if
two ran at once: each step is one conditional UPDATE/DELETE in a transaction, so a second pass finds
nothing left to do. The grace period separates a slow renewal (lease lapsed: the node is fenced and takes
no new work, but its sandboxes are kept) from a node the cluster gives up on (its running sandboxes become
`lost`, never resumed anywhere, so none is ever served by two nodes; its hibernated ones stay wakeable).
A wake still reserved on a lost node counts as running: its agent may already have started it, so it is
lost too rather than woken a second time elsewhere (the returning agent is told to kill it).
"""

from __future__ import annotations

from tartarus.cluster import events
from tartarus.cluster.db import Connection, reports_outages
from tartarus.cluster.model import LostNode, Sweep
from tartarus.errors import InvalidArgument

DEFAULT_GRACE_S = 30.0


@reports_outages
def sweep(conn: Connection, *, grace_s: float = DEFAULT_GRACE_S) -> Sweep:
    """One pass: mark lost nodes and their sandboxes, then delete or revert expired reservations."""
    if grace_s < 0:
        raise InvalidArgument("the grace period cannot be negative")
    with conn.transaction():
        nodes = conn.execute(
            "UPDATE cluster.nodes SET state = 'lost', lost_at = now() "
            "WHERE state = 'up' AND lease_expires_at < now() - make_interval(secs => %s) "
            "RETURNING name, epoch",
            (grace_s,),
        ).fetchall()
        lost = []
        for name, epoch in sorted(nodes):
            sandboxes = conn.execute(
                "UPDATE cluster.placements SET state = 'lost', reserved_until = NULL, updated_at = now() "
                "WHERE node = %s AND state IN ('running', 'reserved') RETURNING sandbox_id",
                (name,),
            ).fetchall()
            ids = tuple(sorted(str(r[0]) for r in sandboxes))
            events.record(conn, "node_lost", node=name, epoch=int(epoch), detail=f"sandboxes={len(ids)}")
            for sandbox_id in ids:
                events.record(
                    conn,
                    "sandbox_lost",
                    node=name,
                    epoch=int(epoch),
                    sandbox_id=sandbox_id,
                    detail="its node was lost",
                )
            lost.append(LostNode(name, int(epoch), ids))
        reclaimed = reclaim_expired(conn)
    return Sweep(lost=tuple(lost), reclaimed=reclaimed)


@reports_outages
def reclaim_expired(conn: Connection) -> tuple[str, ...]:
    """Reservations whose holder never confirmed nor released them: a fresh placement is deleted, a wake
    goes back to hibernated on its origin node. Capacity accounting already ignores them (see USED_JOIN);
    this keeps the table tidy and frees the sandbox id."""
    with conn.transaction():
        woken = conn.execute(
            "UPDATE cluster.placements SET state = 'hibernated', node = origin, reserved_until = NULL, "
            "updated_at = now() WHERE state = 'reserved' AND reserved_until <= now() AND origin IS NOT NULL "
            "RETURNING sandbox_id, node"
        ).fetchall()
        fresh = conn.execute(
            "DELETE FROM cluster.placements WHERE state = 'reserved' AND reserved_until <= now() "
            "RETURNING sandbox_id, node"
        ).fetchall()
        for sandbox_id, node in [*woken, *fresh]:
            events.record(conn, "reservation_expired", node=node, sandbox_id=sandbox_id)
    return tuple(sorted(str(r[0]) for r in [*woken, *fresh]))
