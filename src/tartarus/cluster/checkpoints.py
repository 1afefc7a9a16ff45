"""Checkpoints in the cluster: one row per checkpoint in PostgreSQL, its state a capture in the object store.

On a single host a checkpoint is a directory of its daemon. In a cluster it must outlive its node and serve
copies on any node, so the row (not any node's directory) is the checkpoint: who owns it, the node that
took it (a placement bonus: it holds the files already), its capture and what the API shows of it. A node
that restores it fetches the capture into its own checkpoints directory first. As on a single host, a
checkpoint with a TTL is deleted that long after its last use (`used`), on the database's clock, by the
reconciler (`expire`); each node's copy expires on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from tartarus.cluster import events
from tartarus.cluster.db import Connection, reports_outages
from tartarus.cluster.manifest import check_capture
from tartarus.cluster.model import check_name
from tartarus.errors import Conflict, NotFound

_COLUMNS = (
    "id, tenant, sandbox_id, template, node, capture, vcpus, memory_mib, captured_at, disk_bytes, ttl_s"
)


@dataclass(frozen=True)
class StoredCheckpoint:
    id: str
    tenant: str
    sandbox_id: str  # the sandbox it was captured from
    template: str
    node: str  # the node that took it (its files are still there)
    capture: str  # in the object store
    vcpus: int
    memory_mib: int
    captured_at: float
    disk_bytes: int
    ttl_s: float | None

    def __post_init__(self) -> None:
        check_name("checkpoint id", self.id)
        check_name("node name", self.node)
        check_capture(self.capture)


def _row(r: tuple[object, ...]) -> StoredCheckpoint:
    return StoredCheckpoint(
        id=str(r[0]),
        tenant=str(r[1]),
        sandbox_id=str(r[2]),
        template=str(r[3]),
        node=str(r[4]),
        capture=str(r[5]),
        vcpus=int(str(r[6])),
        memory_mib=int(str(r[7])),
        captured_at=float(str(r[8])),
        disk_bytes=int(str(r[9])),
        ttl_s=None if r[10] is None else float(str(r[10])),
    )


@reports_outages
def record(conn: Connection, cp: StoredCheckpoint) -> None:
    """Its capture is in the object store: from now on any node may restore it."""
    with conn.transaction():
        inserted = conn.execute(
            f"INSERT INTO cluster.checkpoints ({_COLUMNS}) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
            (
                cp.id,
                cp.tenant,
                cp.sandbox_id,
                cp.template,
                cp.node,
                cp.capture,
                cp.vcpus,
                cp.memory_mib,
                cp.captured_at,
                cp.disk_bytes,
                cp.ttl_s,
            ),
        ).rowcount
        if not inserted:
            raise Conflict(f"checkpoint {cp.id} is already in the cluster")
        events.record(
            conn, "checkpoint", node=cp.node, sandbox_id=cp.sandbox_id, detail=f"{cp.id} {cp.capture}"
        )


@reports_outages
def find(conn: Connection, checkpoint_id: str, tenant: str | None) -> StoredCheckpoint:
    """The checkpoint, if `tenant` owns it (None: an admin, any tenant's); NotFound otherwise."""
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM cluster.checkpoints WHERE id = %s AND (%s::text IS NULL OR tenant = %s)",
        (checkpoint_id, tenant, tenant),
    ).fetchone()
    if row is None:
        raise NotFound(f"no checkpoint {checkpoint_id!r}")
    return _row(row)


@reports_outages
def listed(conn: Connection, tenant: str | None) -> list[StoredCheckpoint]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM cluster.checkpoints WHERE %s::text IS NULL OR tenant = %s "
        "ORDER BY captured_at",
        (tenant, tenant),
    ).fetchall()
    return [_row(r) for r in rows]


@reports_outages
def remove(conn: Connection, checkpoint_id: str, tenant: str | None) -> StoredCheckpoint:
    """Deleted: no new sandbox starts from it (its chunks stay in the bucket until collected)."""
    with conn.transaction():
        row = conn.execute(
            f"DELETE FROM cluster.checkpoints WHERE id = %s AND (%s::text IS NULL OR tenant = %s) "
            f"RETURNING {_COLUMNS}",
            (checkpoint_id, tenant, tenant),
        ).fetchone()
        if row is None:
            raise NotFound(f"no checkpoint {checkpoint_id!r}")
        cp = _row(row)
        events.record(conn, "checkpoint_deleted", node=cp.node, sandbox_id=cp.sandbox_id, detail=cp.id)
    return cp


@reports_outages
def used(conn: Connection, checkpoint_id: str) -> None:
    """A sandbox started from it: its TTL counts from now."""
    conn.execute("UPDATE cluster.checkpoints SET used_at = now() WHERE id = %s", (checkpoint_id,))


@reports_outages
def expire(conn: Connection) -> list[str]:
    """Delete the checkpoints unused for longer than their TTL; their ids."""
    with conn.transaction():
        rows = conn.execute(
            "DELETE FROM cluster.checkpoints "
            "WHERE ttl_s IS NOT NULL AND used_at + make_interval(secs => ttl_s) < now() RETURNING id, node"
        ).fetchall()
        for cid, node in rows:
            events.record(conn, "checkpoint_expired", node=str(node), detail=str(cid))
    return sorted(str(r[0]) for r in rows)
