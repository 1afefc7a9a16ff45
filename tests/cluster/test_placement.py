"""Placement against the suite's real PostgreSQL: capacity under concurrent placers, refusal and retry,
quarantine, reservations that expire (a gateway or PostgreSQL dying mid-placement), wake locality.

Nodes are simulated rows (see helpers.py) and each thread with its own connection stands for a gateway:
this is the placement logic at scale, which needs no VM; that a placed sandbox runs is the roles' test."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from tartarus.cluster import events
from tartarus.cluster.db import Connection, connect
from tartarus.cluster.errors import ClusterUnavailable, NoCapacity, NodeRefused, ReservationLost
from tartarus.cluster.membership import Membership
from tartarus.cluster.model import Admin, PlacementState, Reservation, Resources
from tartarus.cluster.placement import Placer
from tartarus.cluster.reconcile import reclaim_expired, sweep
from tartarus.errors import Conflict, NotFound
from tests.cluster.helpers import demand, register, until, wait_db_clock_past


def test_concurrent_placements_never_exceed_capacity(cluster_url: str, conn: Connection) -> None:
    """200 placements from 8 connections over 3 nodes with 50 slots each: exactly 150 succeed."""
    for name in ("n1", "n2", "n3"):
        register(conn, name, capacity=Resources(vcpus=1000, memory_mib=10**6, disk_mib=10**6, slots=50))
    ids = [f"sb{i}" for i in range(200)]
    placed: list[Reservation] = []
    refused: list[NoCapacity] = []
    other: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def gateway(share: list[str]) -> None:
        with connect(cluster_url) as c:
            placer = Placer(c)
            start.wait()
            for sandbox_id in share:
                try:
                    r = placer.reserve(demand(sandbox_id))
                    placer.confirm(r)
                    with lock:
                        placed.append(r)
                except NoCapacity as e:
                    with lock:
                        refused.append(e)
                except BaseException as e:
                    with lock:
                        other.append(e)

    threads = [threading.Thread(target=gateway, args=(ids[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert other == []
    assert len(placed) == 150 and len(refused) == 50
    assert all("no capacity" in e.message for e in refused)
    assert Counter(r.node for r in placed) == {"n1": 50, "n2": 50, "n3": 50}
    rows = conn.execute("SELECT node, count(*) FROM cluster.placements GROUP BY node").fetchall()
    assert dict(rows) == {"n1": 50, "n2": 50, "n3": 50}
    assert all(v.used.slots == 50 for v in Membership(conn).nodes())


def test_memory_bounds_placement_too(conn: Connection) -> None:
    register(conn, "small", capacity=Resources(vcpus=100, memory_mib=1000, disk_mib=0, slots=100))
    placer = Placer(conn)
    placer.reserve(demand("a", memory_mib=600))
    with pytest.raises(NoCapacity, match="no healthy schedulable node has room"):
        placer.reserve(demand("b", memory_mib=600))
    placer.reserve(demand("c", memory_mib=400))


def test_a_refusing_node_is_released_and_another_tried(conn: Connection) -> None:
    register(conn, "a")
    register(conn, "b")
    tried: list[str] = []

    def start(r: Reservation) -> None:
        tried.append(r.node)
        if r.node == "a":
            raise NodeRefused("agent a is out of disk")

    placer = Placer(conn)
    result = placer.place(demand("sb"), start)
    assert tried == ["a", "b"] and result.node == "b"
    assert placer.locate("sb").state == PlacementState.RUNNING
    assert Membership(conn).node("a").used.slots == 0  # a's reservation was given back
    assert [e.kind for e in events.recent(conn, node="a")][:2] == ["released", "reserved"]

    def refuse_all(r: Reservation) -> None:
        raise NodeRefused("no")

    with pytest.raises(NoCapacity, match="refused by a, b"):
        placer.place(demand("sb2"), refuse_all)
    assert conn.execute("SELECT count(*) FROM cluster.placements").fetchone() == (1,)


def test_a_failing_start_call_releases_its_reservation(conn: Connection) -> None:
    register(conn, "a")
    placer = Placer(conn)

    def boom(r: Reservation) -> None:
        raise RuntimeError("connection reset")

    with pytest.raises(RuntimeError):
        placer.place(demand("sb"), boom)
    assert Membership(conn).node("a").used.slots == 0


def test_quarantine_verdicts_land_only_on_quarantine_nodes(conn: Connection) -> None:
    register(conn, "plain")
    placer = Placer(conn)
    with pytest.raises(NoCapacity, match="quarantine"):
        placer.reserve(demand("q1", quarantine=True))
    register(conn, "iso", labels=frozenset({"quarantine"}))
    assert {placer.reserve(demand(f"q{i}", quarantine=True)).node for i in range(4)} == {"iso"}
    assert {placer.reserve(demand(f"p{i}")).node for i in range(4)} == {"plain"}


def test_unhealthy_nodes_are_not_chosen(conn: Connection) -> None:
    lease = register(conn, "stale", lease_s=0.3).lease
    register(conn, "fresh")
    wait_db_clock_past(conn, lease.expires_at.timestamp())
    assert {Placer(conn).reserve(demand(f"s{i}")).node for i in range(3)} == {"fresh"}


def test_a_sandbox_is_never_placed_twice(conn: Connection) -> None:
    register(conn, "a")
    register(conn, "b")
    placer = Placer(conn)
    placer.confirm(placer.reserve(demand("one")))
    with pytest.raises(Conflict, match="placed twice"):
        placer.reserve(demand("one"))


def test_an_expired_reservation_holds_nothing_and_cannot_be_confirmed(conn: Connection) -> None:
    register(conn, "a", capacity=Resources(vcpus=8, memory_mib=8192, disk_mib=0, slots=1))
    placer = Placer(conn, reservation_s=0.3)
    r = placer.reserve(demand("slow"))
    with pytest.raises(NoCapacity):
        placer.reserve(demand("next"))
    wait_db_clock_past(conn, r.expires_at.timestamp())
    assert Membership(conn).node("a").used.slots == 0
    with pytest.raises(ReservationLost):
        placer.confirm(r)
    placer.confirm(placer.reserve(demand("next")))  # its capacity was free for the next one
    assert sweep(conn).reclaimed == ("slow",)


def test_a_confirm_after_the_node_was_fenced_is_refused(conn: Connection) -> None:
    register(conn, "a")
    placer = Placer(conn)
    r = placer.reserve(demand("sb"))
    register(conn, "a")  # the agent restarted: new epoch
    with pytest.raises(ReservationLost, match="fenced"):
        placer.confirm(r)


def test_a_confirm_and_its_event_are_one_and_a_refused_one_is_recorded(conn: Connection) -> None:
    register(conn, "a")
    placer = Placer(conn)
    placer.confirm(placer.reserve(demand("pending-1")), as_id="sb-given")
    assert placer.locate("sb-given").state == PlacementState.RUNNING
    placed = events.recent(conn, node="a")[0]
    assert (placed.kind, placed.sandbox_id, placed.detail) == ("placed", "sb-given", "reserved as pending-1")
    late = placer.reserve(demand("sb-late"))
    register(conn, "a")  # fenced before it confirmed: neither the placement nor a `placed` event
    with pytest.raises(ReservationLost):
        placer.confirm(late)
    assert events.recent(conn, node="a")[0].kind == "confirm_refused"
    assert not [e for e in events.recent(conn, node="a") if e.kind == "placed" and e.sandbox_id == "sb-late"]


def test_postgres_restart_mid_placement_leaks_no_reservation(
    cluster_url: str, postgres_server_url: str
) -> None:
    """The gateway reserved, then PostgreSQL restarted (dropping every connection) before it confirmed:
    the reservation stops counting at its deadline and the reconciler removes it."""
    from tests.pg import restart

    with connect(cluster_url) as c:
        register(c, "a", capacity=Resources(vcpus=8, memory_mib=8192, disk_mib=0, slots=1))
        gateway = Placer(c, reservation_s=1.0)
        r = gateway.reserve(demand("orphan"))
        restart(postgres_server_url)
        with pytest.raises(ClusterUnavailable):  # its session is gone: a clear error, not a driver one
            gateway.confirm(r)
    with connect(cluster_url) as c:
        wait_db_clock_past(c, r.expires_at.timestamp())
        assert Membership(c).node("a").used.slots == 0
        assert reclaim_expired(c) == ("orphan",)
        assert c.execute("SELECT count(*) FROM cluster.placements").fetchone() == (0,)


def test_postgres_restart_inside_the_reservation_transaction_commits_nothing(
    cluster_url: str, postgres_server_url: str
) -> None:
    """A placer is inside its reservation transaction (waiting on the node's row lock another placer
    holds) when PostgreSQL restarts: it gets ClusterUnavailable and no reservation exists afterwards."""
    from tests.pg import restart

    with connect(cluster_url) as c:
        register(c, "a")
    outcome: list[BaseException] = []
    holder, c = connect(cluster_url), connect(cluster_url)
    try:
        holder.execute("BEGIN")
        holder.execute("SELECT 1 FROM cluster.nodes WHERE name = 'a' FOR UPDATE")
        placer = Placer(c)

        def place() -> None:
            try:
                placer.reserve(demand("midway"))
            except BaseException as e:
                outcome.append(e)

        thread = threading.Thread(target=place)
        thread.start()
        assert until(lambda: _waiting_on_a_lock(cluster_url)), "the placer never blocked on the node"
        restart(postgres_server_url)
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        holder.close()  # its session died with the restart: close, do not try to commit
        c.close()
    assert len(outcome) == 1 and isinstance(outcome[0], ClusterUnavailable), outcome
    with connect(cluster_url) as c:
        assert c.execute("SELECT count(*) FROM cluster.placements").fetchone() == (0,)
        assert Membership(c).node("a").used == Resources()
        Placer(c).confirm(Placer(c).reserve(demand("midway")))  # and the id is free to place again


def _waiting_on_a_lock(url: str) -> bool:
    with connect(url) as c:
        row = c.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND datname = current_database()"
        ).fetchone()
    return bool(row and row[0])


def test_wake_prefers_the_origin_node_and_a_released_wake_goes_back_to_hibernated(conn: Connection) -> None:
    register(conn, "a")
    register(conn, "b")
    placer = Placer(conn)
    r = placer.reserve(demand("sleepy"))
    placer.confirm(r)
    placer.hibernated("sleepy", r.node, r.epoch, "sleepy.cap")
    origin = r.node
    # Load the origin a little more than the other node; the origin bonus still wins.
    other = "b" if origin == "a" else "a"
    for i in range(2):
        placer.confirm(placer.reserve(demand(f"load{i}")))
    wake = placer.reserve(demand("sleepy", origin=origin))
    assert wake.node == origin and wake.wake
    placer.release(wake)
    assert placer.locate("sleepy").state == PlacementState.HIBERNATED
    # The origin node is cordoned: the wake goes elsewhere, and confirms there.
    Membership(conn).set_admin(origin, Admin.CORDONED)
    moved = placer.reserve(demand("sleepy", origin=origin))
    assert moved.node == other
    placer.confirm(moved)
    assert placer.locate("sleepy").node == other


def test_a_placement_is_confirmed_under_the_id_the_agent_gave(conn: Connection) -> None:
    """The gateway reserves under a provisional id (the agent names the sandbox): the running placement,
    and what routing finds, carry the agent's id; the provisional one is free again."""
    register(conn, "n1")
    placed = Placer(conn).place(demand("pending-1"), lambda r: "sb-given")
    assert placed.sandbox_id == "sb-given" and placed.node == "n1"
    where = Placer(conn).locate("sb-given")
    assert where.state == PlacementState.RUNNING and where.node == "n1" and where.node_healthy
    with pytest.raises(NotFound):
        Placer(conn).locate("pending-1")
    kinds = [(e.kind, e.sandbox_id) for e in events.recent(conn)]
    assert ("placed", "sb-given") in kinds


def test_routing_sees_a_node_whose_lease_lapsed(conn: Connection) -> None:
    register(conn, "n1", lease_s=0.5)
    Placer(conn).place(demand("sb1"), lambda r: None)
    assert Placer(conn).locate("sb1").node_healthy
    assert until(lambda: not Placer(conn).locate("sb1").node_healthy, timeout=5)


def test_a_stored_sandbox_has_one_waker_and_its_capture_survives_a_failed_wake(
    cluster_url: str, conn: Connection
) -> None:
    """Hibernated into the object store, a sandbox is woken through its one placement row: of two wakes
    reserved at once (two gateways), one conflicts; a released or expired wake keeps the capture (it is
    still the sandbox); the waking agent's own confirm makes it run there, and only under its epoch."""
    a, b = register(conn, "a"), register(conn, "b")
    placer = Placer(conn, reservation_s=0.5)
    placer.confirm(placer.reserve(demand("sb")))
    home = placer.locate("sb").node
    with pytest.raises(Conflict):
        placer.wake_demand("sb")  # running: nothing to wake
    epoch = (a if home == "a" else b).lease.epoch
    placer.hibernated("sb", home, epoch, "sb.cap1")
    where = placer.locate("sb")
    assert where.stored and not where.waking and where.capture == "sb.cap1"
    wanted, capture = placer.wake_demand("sb")
    assert capture == "sb.cap1" and wanted.origin == home and wanted.vcpus == 1

    with connect(cluster_url) as other:
        first = placer.reserve(wanted)
        with pytest.raises(Conflict):
            Placer(other).reserve(wanted)  # the other gateway's wake: it waits instead
        assert placer.locate("sb").waking
        placer.release(first, why="refused")
        assert placer.locate("sb").capture == "sb.cap1" and placer.locate("sb").stored
        expired = Placer(other, reservation_s=0.2).reserve(wanted)
        wait_db_clock_past(conn, expired.expires_at.timestamp())
        with pytest.raises(ReservationLost):  # the agent confirming too late stops its copy
            placer.confirm_wake("sb", expired.node, expired.epoch)
        assert "sb" in reclaim_expired(conn)
        assert placer.locate("sb").stored and placer.locate("sb").capture == "sb.cap1"

    woken = placer.reserve(wanted)
    with pytest.raises(ReservationLost):
        placer.confirm_wake("sb", woken.node, woken.epoch + 1)  # a stale epoch never confirms
    placer.confirm_wake("sb", woken.node, woken.epoch)
    where = placer.locate("sb")
    assert where.state == PlacementState.RUNNING and where.node == woken.node and where.capture is None
    with pytest.raises(Conflict):
        placer.wake_demand("sb")
    with pytest.raises(Conflict):
        placer.ended_stored("sb")  # running on a node: that node ends it
    placer.hibernated("sb", woken.node, woken.epoch, "sb.cap2")
    assert placer.ended_stored("sb") == "sb.cap2"
    with pytest.raises(NotFound):
        placer.locate("sb")
