"""The agent's lease loop against the suite's real PostgreSQL (a simulated node: no agent behind it)."""

from __future__ import annotations

import threading

import psycopg

from tartarus.cluster.db import Connection
from tartarus.cluster.errors import Fenced
from tartarus.cluster.lease import LeaseKeeper
from tartarus.cluster.membership import Membership
from tartarus.cluster.model import NodeSpec
from tests.cluster.helpers import ROOMY, register, until

SPEC = NodeSpec("agent-1", "10.0.0.9:7000", ROOMY)


def test_the_keeper_keeps_the_lease_alive_across_many_lease_periods(
    cluster_url: str, conn: Connection
) -> None:
    keeper = LeaseKeeper(cluster_url, SPEC, lease_s=0.6)
    try:
        epoch = keeper.join().lease.epoch
        assert until(lambda: keeper.renewals >= 8, timeout=20)  # ~4 lease periods
        assert keeper.holds()
        view = Membership(conn).node("agent-1")
        assert view.healthy and view.epoch == epoch
    finally:
        keeper.stop()
    # Stopped: nothing renews, the lease lapses, and the local view says so first.
    assert until(lambda: not keeper.holds(), timeout=5)
    assert until(lambda: not Membership(conn).node("agent-1").healthy, timeout=5)


def test_the_keeper_survives_losing_its_connection(cluster_url: str, conn: Connection) -> None:
    keeper = LeaseKeeper(cluster_url, SPEC, lease_s=1.5)
    try:
        keeper.join()
        assert until(lambda: keeper.renewals >= 1)
        pid = keeper._conn.info.backend_pid if keeper._conn else None
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        before = keeper.renewals
        assert until(lambda: keeper.renewals >= before + 2, timeout=10)
        assert keeper.holds() and Membership(conn).node("agent-1").healthy
    finally:
        keeper.stop()


def test_a_newer_epoch_fences_the_keeper_and_it_rejoins(cluster_url: str, conn: Connection) -> None:
    fenced: list[Fenced] = []
    seen = threading.Event()

    def on_fenced(e: Fenced) -> None:
        fenced.append(e)
        seen.set()

    keeper = LeaseKeeper(cluster_url, SPEC, lease_s=0.6, on_fenced=on_fenced)
    try:
        first = keeper.join().lease.epoch
        register(conn, "agent-1")  # another process registered under the same name: a newer epoch
        assert seen.wait(10)
        assert "replaced it" in fenced[0].message and not keeper.holds()
        again = keeper.rejoin()
        assert again.lease.epoch == first + 2 and keeper.holds()
    finally:
        keeper.stop()


def test_connection_loss_alone_drops_holds_at_the_local_deadline(
    cluster_url: str, conn: Connection, postgres_server_url: str
) -> None:
    """The database unreachable (the keeper's session killed, new connections refused): holds() turns
    False on the agent's own clock without any answer from the database."""
    keeper = LeaseKeeper(cluster_url, SPEC, lease_s=0.9)
    name = conn.info.dbname
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        try:
            keeper.join()
            admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            pid = keeper._conn.info.backend_pid if keeper._conn else None
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            assert until(lambda: not keeper.holds(), timeout=5)
            assert keeper.lease is not None  # not told it is fenced: it just cannot know it still holds
        finally:
            admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
            keeper.stop()
