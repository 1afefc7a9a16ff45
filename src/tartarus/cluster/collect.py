"""Collecting the object store: mark and sweep the captures and chunks nothing names any more.

Mark: the captures the cluster still names (a stored sandbox's placement, a checkpoint's row) and every
template snapshot (`snapshot-*`: cheap to keep, and a node may fetch one at any time). Sweep: the other
manifests, then the chunks no kept manifest names. Both only past a grace period, on the store's
timestamps: a manifest is written before its placement or row names it, and an upload deduplicates
against chunks that exist when it starts; `StateStore` writes again a deduplicated chunk older than its
`refresh_s`, so with a grace of at least twice that, no chunk an upload in progress counts on goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from tartarus.cluster.db import Connection, reports_outages
from tartarus.cluster.manifest import Manifest
from tartarus.cluster.objects import ObjectStore
from tartarus.cluster.statestore import REFRESH_S
from tartarus.errors import InvalidArgument

DEFAULT_GRACE_S = 2 * REFRESH_S
SNAPSHOTS = "snapshot-"
_MANIFESTS, _CHUNKS = "manifests/", "chunks/"


@dataclass(frozen=True)
class Collected:
    captures: tuple[str, ...]  # manifests deleted
    chunks: int  # chunk objects deleted
    kept_captures: int
    kept_chunks: int


@reports_outages
def named(conn: Connection) -> set[str]:
    """The captures the cluster names now."""
    rows = conn.execute(
        "SELECT capture FROM cluster.placements WHERE capture IS NOT NULL "
        "UNION SELECT capture FROM cluster.checkpoints"
    ).fetchall()
    return {str(r[0]) for r in rows}


def collect(
    conn: Connection, objects: ObjectStore, *, grace_s: float = DEFAULT_GRACE_S, now: datetime | None = None
) -> Collected:
    if grace_s < 0:
        raise InvalidArgument("the grace period cannot be negative")
    now = now or datetime.now(UTC)

    def old(at: datetime) -> bool:
        return (now - at).total_seconds() >= grace_s

    live = named(conn)
    kept: list[str] = []
    dropped: list[str] = []
    for key, at in objects.listing(_MANIFESTS):
        capture = key[len(_MANIFESTS) : -len(".json")]
        if capture in live or capture.startswith(SNAPSHOTS) or not old(at):
            kept.append(key)
        else:
            dropped.append(capture)
    referenced = {ref.key for key in kept for ref in Manifest.parse(objects.get(key)).chunk_refs}
    for capture in dropped:
        objects.delete(f"{_MANIFESTS}{capture}.json")
    swept = kept_chunks = 0
    for key, at in objects.listing(_CHUNKS):
        if key in referenced or not old(at):
            kept_chunks += 1
            continue
        objects.delete(key)
        swept += 1
    return Collected(tuple(sorted(dropped)), swept, len(kept), kept_chunks)
