"""The cluster's checkpoint rows on the suite's real PostgreSQL: a tenant sees only its own, an id is
recorded once, a delete is the end of it, and a TTL counts from the last use."""

from __future__ import annotations

import pytest

from tartarus.cluster import checkpoints
from tartarus.cluster.checkpoints import StoredCheckpoint
from tartarus.cluster.db import Connection
from tartarus.cluster.reconciler import Reconciler
from tartarus.errors import Conflict, InvalidArgument, NotFound
from tests.cluster.helpers import db_now, wait_db_clock_past


def _cp(cid: str, tenant: str, captured_at: float = 1.0, ttl_s: float | None = None) -> StoredCheckpoint:
    return StoredCheckpoint(
        id=cid,
        tenant=tenant,
        sandbox_id="sb-1",
        template="python-ds",
        node="node-a",
        capture=f"{cid}.abc123",
        vcpus=1,
        memory_mib=512,
        captured_at=captured_at,
        disk_bytes=4096,
        ttl_s=ttl_s,
    )


def test_a_tenant_sees_and_deletes_only_its_own_checkpoints(conn: Connection) -> None:
    checkpoints.record(conn, _cp("ck-1", "alpha", 2.0))
    checkpoints.record(conn, _cp("ck-2", "beta", 1.0))
    assert checkpoints.find(conn, "ck-1", "alpha") == _cp("ck-1", "alpha", 2.0)
    with pytest.raises(NotFound):
        checkpoints.find(conn, "ck-1", "beta")
    assert [c.id for c in checkpoints.listed(conn, "alpha")] == ["ck-1"]
    assert [c.id for c in checkpoints.listed(conn, None)] == ["ck-2", "ck-1"]  # an admin: all, oldest first
    with pytest.raises(NotFound):
        checkpoints.remove(conn, "ck-1", "beta")
    assert checkpoints.remove(conn, "ck-1", "alpha").capture == "ck-1.abc123"
    with pytest.raises(NotFound):
        checkpoints.find(conn, "ck-1", None)
    assert [c.id for c in checkpoints.listed(conn, None)] == ["ck-2"]


def test_a_checkpoint_is_recorded_once_and_names_are_checked(conn: Connection) -> None:
    checkpoints.record(conn, _cp("ck-1", "alpha"))
    with pytest.raises(Conflict):
        checkpoints.record(conn, _cp("ck-1", "beta"))
    assert checkpoints.find(conn, "ck-1", None).tenant == "alpha"
    with pytest.raises(InvalidArgument):
        _cp("../etc", "alpha")


def test_a_checkpoint_expires_its_ttl_after_its_last_use(cluster_url: str, conn: Connection) -> None:
    checkpoints.record(conn, _cp("ck-short", "alpha", ttl_s=1.0))
    checkpoints.record(conn, _cp("ck-forever", "alpha"))
    start = db_now(conn)
    wait_db_clock_past(conn, start + 0.6)
    checkpoints.used(conn, "ck-short")  # a sandbox started from it: its TTL counts from now
    used_by = db_now(conn)
    wait_db_clock_past(conn, start + 1.05)
    assert checkpoints.expire(conn) == []  # over 1 s since recorded, but about 0.45 since its last use
    wait_db_clock_past(conn, used_by + 1.05)
    # The reconciler's pass deletes it; one without a TTL stays.
    reconciler = Reconciler(cluster_url)
    try:
        assert reconciler.step() is not None
    finally:
        reconciler.stop()
    assert [c.id for c in checkpoints.listed(conn, None)] == ["ck-forever"]
