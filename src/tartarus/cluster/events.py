"""The cluster's audit trail: every placement and fencing decision, written in the deciding transaction.

Recording inside the same transaction as the change means the log cannot claim a decision that rolled
back, nor miss one that committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from tartarus.cluster.db import Connection


@dataclass(frozen=True)
class Event:
    at: datetime
    kind: str
    node: str | None
    epoch: int | None
    sandbox_id: str | None
    detail: str


def record(
    conn: Connection,
    kind: str,
    *,
    node: str | None = None,
    epoch: int | None = None,
    sandbox_id: str | None = None,
    detail: str = "",
) -> None:
    conn.execute(
        "INSERT INTO cluster.events (kind, node, epoch, sandbox_id, detail) VALUES (%s, %s, %s, %s, %s)",
        (kind, node, epoch, sandbox_id, detail),
    )


def recent(conn: Connection, *, node: str | None = None, limit: int = 100) -> list[Event]:
    """The newest events first, optionally for one node."""
    rows = conn.execute(
        "SELECT at, kind, node, epoch, sandbox_id, detail FROM cluster.events "
        "WHERE %(node)s::text IS NULL OR node = %(node)s ORDER BY id DESC LIMIT %(limit)s",
        {"node": node, "limit": limit},
    ).fetchall()
    return [
        Event(
            at=r[0],
            kind=str(r[1]),
            node=None if r[2] is None else str(r[2]),
            epoch=None if r[3] is None else int(r[3]),
            sandbox_id=None if r[4] is None else str(r[4]),
            detail=str(r[5]),
        )
        for r in rows
    ]
