"""Two gateways' reconciler loops against the suite's real PostgreSQL: one sweeps, and the other takes
over when the first one's session dies. Nodes are simulated rows (see helpers.py)."""

from __future__ import annotations

from tartarus.cluster.db import Connection
from tartarus.cluster.membership import Membership
from tartarus.cluster.model import NodeState
from tartarus.cluster.reconciler import Reconciler
from tests.cluster.helpers import register, until


def test_one_reconciler_sweeps_and_another_takes_over_when_it_dies(
    cluster_url: str, conn: Connection
) -> None:
    first = Reconciler(cluster_url, grace_s=0.2, interval_s=0.1)
    second = Reconciler(cluster_url, grace_s=0.2, interval_s=0.1)
    first.start()
    assert until(lambda: first.passes > 0)
    second.start()
    try:
        register(conn, "early", lease_s=0.3)
        assert until(lambda: Membership(conn).node("early").state == NodeState.LOST)
        assert second.passes == 0  # it never held the election, so it never swept
        # The first gateway dies: its loop stops campaigning and the server ends its session (as when
        # the process is killed), without a clean release.
        pid = first.election.backend_pid
        first._stop.set()
        assert first._thread is not None
        first._thread.join()
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert until(lambda: second.passes > 0), "the second gateway did not take over"
        register(conn, "late", lease_s=0.3)
        assert until(lambda: Membership(conn).node("late").state == NodeState.LOST)
    finally:
        first.stop()
        second.stop()
