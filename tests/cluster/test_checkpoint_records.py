"""The cluster's checkpoint rows on the suite's real PostgreSQL: a tenant sees only its own, an id is
recorded once, and a delete is the end of it."""

from __future__ import annotations

import pytest

from tartarus.cluster import checkpoints
from tartarus.cluster.checkpoints import StoredCheckpoint
from tartarus.cluster.db import Connection
from tartarus.errors import Conflict, InvalidArgument, NotFound


def _cp(cid: str, tenant: str, captured_at: float = 1.0) -> StoredCheckpoint:
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
        ttl_s=None,
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
