"""The reconciler election is a real PostgreSQL session advisory lock: it moves when the holder dies."""

from __future__ import annotations

import psycopg

from tartarus.cluster.election import Election
from tests.cluster.helpers import until


def test_one_holder_and_takeover_when_its_session_is_killed(cluster_url: str) -> None:
    a, b = Election(cluster_url), Election(cluster_url)
    other = Election(cluster_url, name="something-else")
    try:
        assert a.try_acquire() and a.holding()
        assert not b.try_acquire()
        assert other.try_acquire()  # a different election does not contend
        assert a.backend_pid is not None
        with psycopg.connect(cluster_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (a.backend_pid,))
        assert until(b.try_acquire), "b did not take over after a's session died"
        assert not a.holding()
        assert not a.try_acquire()  # a reconnects, but b holds it now
        b.release()
        assert until(a.try_acquire)
    finally:
        for e in (a, b, other):
            e.release()


def test_holding_is_read_back_from_pg_locks_for_negative_keys_too(cluster_url: str) -> None:
    """Advisory keys are signed int4; pg_locks shows them as oids. A name hashing to a negative key
    ("a") must still be recognised as held, or its holder would keep re-campaigning."""
    from tartarus.cluster.election import _key

    assert _key("a") < 0 < _key("reconciler")
    for name in ("a", "reconciler"):
        e = Election(cluster_url, name=name)
        try:
            assert e.try_acquire() and e.holding()
        finally:
            e.release()
        assert not e.holding()
