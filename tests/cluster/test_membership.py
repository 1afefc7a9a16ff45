"""Membership against the suite's real PostgreSQL: epochs, leases on the database clock, fencing, lost
nodes, cordon and drain. Nodes are simulated rows (see helpers.py): this is coordination logic only."""

from __future__ import annotations

import pytest

from tartarus.cluster import events
from tartarus.cluster.db import Connection
from tartarus.cluster.errors import Fenced, UnknownNode
from tartarus.cluster.membership import Membership
from tartarus.cluster.model import Admin, NodeState, PlacementState
from tartarus.cluster.placement import Placer
from tartarus.cluster.reconcile import sweep
from tartarus.cluster.schema import LATEST, migrate
from tests.cluster.helpers import demand, register, wait_db_clock_past


def test_migrate_is_idempotent(conn: Connection) -> None:
    assert migrate(conn) == []
    row = conn.execute("SELECT max(version) FROM cluster.schema_migrations").fetchone()
    assert row is not None and row[0] == LATEST


def test_registration_takes_a_new_epoch_each_time(conn: Connection) -> None:
    first = register(conn, "n1")
    again = register(conn, "n1")
    assert (first.lease.epoch, again.lease.epoch) == (1, 2)
    assert register(conn, "n2").lease.epoch == 1
    view = Membership(conn).node("n1")
    assert view.healthy and view.epoch == 2 and view.state == NodeState.UP


def test_renewal_extends_the_lease_on_the_database_clock(conn: Connection) -> None:
    lease = register(conn, "n1", lease_s=5).lease
    renewed = Membership(conn, lease_s=60).renew(lease)
    assert renewed.epoch == lease.epoch
    assert (renewed.expires_at - lease.expires_at).total_seconds() > 50


def test_a_lapsed_lease_is_fenced_and_re_registering_gives_a_new_epoch(conn: Connection) -> None:
    members = Membership(conn, lease_s=0.3)
    lease = register(conn, "n1", lease_s=0.3).lease
    wait_db_clock_past(conn, lease.expires_at.timestamp())
    assert not members.node("n1").healthy
    with pytest.raises(Fenced, match="lease lapsed"):
        members.renew(lease)
    assert events.recent(conn, node="n1")[0].kind == "fenced"
    fresh = register(conn, "n1", lease_s=30).lease
    assert fresh.epoch == lease.epoch + 1
    with pytest.raises(Fenced, match="epoch 2 replaced it"):  # the old epoch stays refused
        members.renew(lease)
    Membership(conn, lease_s=30).renew(fresh)


def test_a_node_lapsed_past_grace_is_lost_with_its_running_sandboxes(conn: Connection) -> None:
    reg = register(conn, "doomed", lease_s=0.5)
    register(conn, "healthy")
    placer = Placer(conn)
    for i in range(3):
        r = placer.reserve(demand(f"sb{i}"))
        placer.confirm(r)
    on_doomed = sorted(p for p in ("sb0", "sb1", "sb2") if placer.locate(p).node == "doomed")
    assert on_doomed, "the emptiest-first ranking put at least one sandbox on each node"
    hib = next(iter(on_doomed))
    placer.hibernated(hib, "doomed", reg.lease.epoch, "cap-1")
    running = [s for s in on_doomed if s != hib]

    assert sweep(conn, grace_s=0.2).lost == ()  # not yet lapsed
    wait_db_clock_past(conn, reg.lease.expires_at.timestamp() + 0.2)
    result = sweep(conn, grace_s=0.2)
    assert [n.name for n in result.lost] == ["doomed"]
    assert list(result.lost[0].sandboxes) == running
    for s in running:
        assert placer.locate(s).state == PlacementState.LOST
    assert placer.locate(hib).state == PlacementState.HIBERNATED  # still wakeable elsewhere
    wake = placer.reserve(demand(hib, origin="doomed"))
    assert wake.node == "healthy" and wake.wake
    placer.confirm(wake)
    assert Membership(conn).node("doomed").state == NodeState.LOST
    kinds = [(e.kind, e.sandbox_id) for e in events.recent(conn, node="doomed")]
    assert ("node_lost", None) in kinds and all(("sandbox_lost", s) in kinds for s in running)
    assert sweep(conn, grace_s=0.2).lost == ()  # a second pass finds nothing to do

    # The partitioned agent comes back: fenced, then told to kill what the cluster gave up on.
    with pytest.raises(Fenced, match="marked lost"):
        Membership(conn).renew(reg.lease)
    back = register(conn, "doomed", running=tuple(running))
    assert back.lease.epoch == reg.lease.epoch + 1
    assert back.kill == tuple(running) and back.adopted == ()


def test_re_registration_adopts_what_is_still_placed_and_marks_missing_ones_lost(conn: Connection) -> None:
    reg = register(conn, "n1")
    placer = Placer(conn)
    for s in ("keep", "vanished"):
        placer.confirm(placer.reserve(demand(s)))
    again = register(conn, "n1", running=("keep", "stranger"))
    assert again.adopted == ("keep",) and again.kill == ("stranger",) and again.gone == ("vanished",)
    assert placer.locate("keep").epoch == again.lease.epoch == reg.lease.epoch + 1
    assert placer.locate("vanished").state == PlacementState.LOST


def test_cordon_and_drain_stop_new_placements(conn: Connection) -> None:
    register(conn, "a")
    register(conn, "b")
    members, placer = Membership(conn), Placer(conn)
    members.set_admin("a", Admin.CORDONED)
    assert {placer.reserve(demand(f"c{i}")).node for i in range(5)} == {"b"}
    members.set_admin("a", Admin.ACTIVE)
    for i in range(5):
        placer.confirm(placer.reserve(demand(f"d{i}")))
    on_b = {s for s in (f"d{i}" for i in range(5)) if placer.locate(s).node == "b"}
    assert set(members.drain("b")) == on_b
    assert members.node("b").admin == Admin.DRAINING
    assert {placer.reserve(demand(f"e{i}")).node for i in range(3)} == {"a"}
    with pytest.raises(UnknownNode):
        members.set_admin("nope", Admin.CORDONED)
