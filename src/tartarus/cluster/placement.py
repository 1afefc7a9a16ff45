"""Placement: choose a node, reserve capacity on it before the agent is called, then confirm or release.

Each attempt is one transaction: lock the chosen node's row (`FOR UPDATE`), re-read what it has committed,
and insert the reservation only if the sandbox still fits. Concurrent placers through any number of
gateways serialise on that row, so a node's capacity is never exceeded. The first pass uses `SKIP LOCKED`
so concurrent placers spread to the next-best node rather than queue on the best one; nodes skipped that
way are retried blocking before "no capacity" is given, so a busy node is never mistaken for a full one.
An attempt locks one node only, so two placers can never deadlock.

A reservation carries a deadline on the database clock. If its holder dies (or PostgreSQL restarts) before
confirming, it stops counting against the node at that deadline and the reconciler deletes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tartarus.cluster import events
from tartarus.cluster.db import Connection, reports_outages
from tartarus.cluster.errors import NoCapacity, NodeRefused, ReservationLost
from tartarus.cluster.manifest import check_capture
from tartarus.cluster.model import Demand, Location, PlacementState, Reservation, Resources, check_name
from tartarus.cluster.scoring import Candidate, Ranked, rank
from tartarus.cluster.usage import USED_COLUMNS, USED_CTE, USED_JOIN
from tartarus.errors import Conflict, InvalidArgument, NotFound

DEFAULT_RESERVATION_S = 30.0  # long enough to restore a snapshot on the agent, short enough to not strand
DEFAULT_ATTEMPTS = 3

_CANDIDATES = f"""{USED_CTE}
    SELECT n.name, n.address, n.epoch, n.vcpus, n.memory_mib, n.disk_mib, n.slots, n.labels,
        n.templates, {USED_COLUMNS}
    FROM cluster.nodes n {USED_JOIN}
    WHERE n.state = 'up' AND n.admin = 'active' AND n.lease_expires_at > now()
        AND n.labels @> %(labels)s::text[] AND NOT (n.name = ANY(%(exclude)s::text[]))"""

_LOCK_NODE = """SELECT 1 FROM cluster.nodes
    WHERE name = %s AND epoch = %s AND state = 'up' AND admin = 'active' AND lease_expires_at > now()
    FOR UPDATE"""

# Run after the node's row is locked, so its snapshot includes every reservation committed before: what
# the node has committed, the capacity check, the reservation and its audit event in one statement.
# A sandbox id has one row: a new placement inserts it; a wake takes over its `hibernated` row (keeping
# the node it slept on as `origin`); an expired reservation may be taken over. Anything else conflicts.
_RESERVE = """WITH used AS (
        SELECT COALESCE(sum(vcpus), 0) AS vcpus, COALESCE(sum(memory_mib), 0) AS memory_mib,
            COALESCE(sum(disk_mib), 0) AS disk_mib, count(*) AS slots
        FROM cluster.placements
        WHERE node = %(node)s AND (state = 'running' OR (state = 'reserved' AND reserved_until > now()))),
    ins AS (
        INSERT INTO cluster.placements AS p (sandbox_id, node, epoch, state, vcpus, memory_mib, disk_mib,
            template, reserved_until)
        SELECT %(id)s, %(node)s, %(epoch)s, 'reserved', %(vcpus)s, %(mem)s, %(disk)s, %(template)s,
            now() + make_interval(secs => %(ttl)s)
        FROM used, cluster.nodes n
        WHERE n.name = %(node)s AND used.vcpus + %(vcpus)s <= n.vcpus
            AND used.memory_mib + %(mem)s <= n.memory_mib AND used.disk_mib + %(disk)s <= n.disk_mib
            AND used.slots + 1 <= n.slots
        ON CONFLICT (sandbox_id) DO UPDATE SET
            node = EXCLUDED.node, epoch = EXCLUDED.epoch, state = 'reserved',
            origin = CASE WHEN p.state = 'hibernated' THEN p.node ELSE p.origin END,
            vcpus = EXCLUDED.vcpus, memory_mib = EXCLUDED.memory_mib, disk_mib = EXCLUDED.disk_mib,
            template = EXCLUDED.template, reserved_until = EXCLUDED.reserved_until, updated_at = now()
        WHERE p.state = 'hibernated' OR (p.state = 'reserved' AND p.reserved_until <= now())
        RETURNING p.sandbox_id, p.node, p.epoch, p.reserved_until, p.origin IS NOT NULL AS wake),
    ev AS (
        INSERT INTO cluster.events (kind, node, epoch, sandbox_id, detail)
        SELECT 'reserved', node, epoch, sandbox_id, %(detail)s FROM ins)
    SELECT reserved_until, wake FROM ins"""

_CONFIRM = """WITH confirmed AS (
        UPDATE cluster.placements p SET state = 'running', reserved_until = NULL, origin = NULL,
            capture = NULL, sandbox_id = %(id)s, updated_at = now()
        FROM cluster.nodes n
        WHERE p.sandbox_id = %(reserved_as)s AND p.node = %(node)s AND p.epoch = %(epoch)s
            AND p.state = 'reserved' AND p.reserved_until > now() AND n.name = p.node AND n.epoch = p.epoch
            AND n.state = 'up' AND n.lease_expires_at > now()
        RETURNING p.sandbox_id),
    ev AS (
        INSERT INTO cluster.events (kind, node, epoch, sandbox_id, detail)
        SELECT 'placed', %(node)s, %(epoch)s, sandbox_id, %(detail)s FROM confirmed)
    SELECT sandbox_id FROM confirmed"""

_TAKEN = """SELECT state, node FROM cluster.placements WHERE sandbox_id = %s
    AND NOT (state = 'hibernated' OR (state = 'reserved' AND reserved_until <= now()))"""


class Placer:
    """Placement on one connection (one per gateway worker thread)."""

    def __init__(
        self,
        conn: Connection,
        *,
        reservation_s: float = DEFAULT_RESERVATION_S,
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> None:
        if reservation_s <= 0 or attempts < 1:
            raise InvalidArgument("the reservation time and the number of attempts must be positive")
        self.conn = conn
        self.reservation_s = reservation_s
        self.attempts = attempts

    def place(self, demand: Demand, start: Callable[[Reservation], str | None]) -> Reservation:
        """Reserve, call `start` (which contacts the agent), confirm. `start` raising NodeRefused moves on
        to the next node, up to `attempts` nodes; anything else it raises releases and propagates. `start`
        may return the id the agent gave the sandbox: the placement is confirmed under it (the demand's
        id then only held the reservation)."""
        refused: list[str] = []
        for _ in range(self.attempts):
            try:
                reservation = self.reserve(demand, exclude=frozenset(refused))
            except NoCapacity as e:
                if refused:
                    raise NoCapacity(f"{e.message}; refused by {', '.join(refused)}") from e
                raise
            try:
                given = start(reservation)
            except NodeRefused as e:
                self.release(reservation, why=f"refused: {e.message}")
                refused.append(reservation.node)
                continue
            except BaseException:
                self.release(reservation, why="the start call failed")
                raise
            self.confirm(reservation, as_id=given)
            return reservation if given is None else dataclasses.replace(reservation, sandbox_id=given)
        raise NoCapacity(f"sandbox {demand.sandbox_id}: refused by {', '.join(refused)}; no other node tried")

    @reports_outages
    def reserve(self, demand: Demand, exclude: frozenset[str] = frozenset()) -> Reservation:
        """Hold capacity on the best node with room; NoCapacity when none has it."""
        ranked = rank(self._candidates(demand, exclude), demand)
        busy: list[Ranked] = []
        for choice in ranked:
            outcome = self._try(choice, demand, wait=False)
            if isinstance(outcome, Reservation):
                return outcome
            if outcome == "locked":
                busy.append(choice)
        for choice in busy:
            outcome = self._try(choice, demand, wait=True)
            if isinstance(outcome, Reservation):
                return outcome
        labels = ", ".join(sorted(demand.required_labels)) or "none"
        raise NoCapacity(
            f"no capacity for sandbox {demand.sandbox_id} ({demand.vcpus} vCPU, {demand.memory_mib} MiB, "
            f"{demand.disk_mib} MiB disk; labels: {labels}): {len(ranked)} healthy node(s) had room, "
            "none left after locking"
            if ranked
            else f"no capacity for sandbox {demand.sandbox_id} ({demand.vcpus} vCPU, {demand.memory_mib} "
            f"MiB, {demand.disk_mib} MiB disk; labels: {labels}): no healthy schedulable node has room"
        )

    def _candidates(self, demand: Demand, exclude: frozenset[str]) -> list[Candidate]:
        rows = self.conn.execute(
            _CANDIDATES, {"labels": sorted(demand.required_labels), "exclude": sorted(exclude)}
        ).fetchall()
        return [
            Candidate(
                name=r[0],
                address=r[1],
                epoch=int(r[2]),
                capacity=Resources(int(r[3]), int(r[4]), int(r[5]), int(r[6])),
                labels=frozenset(r[7]),
                templates=frozenset(r[8]),
                used=Resources(int(r[9]), int(r[10]), int(r[11]), int(r[12])),
            )
            for r in rows
        ]

    def _try(self, choice: Ranked, demand: Demand, *, wait: bool) -> Reservation | str:
        """One transaction on one node: "locked" (skipped), "full"/"gone", or the reservation."""
        node = choice.candidate
        lock = _LOCK_NODE if wait else _LOCK_NODE + " SKIP LOCKED"
        # Pipelined: BEGIN travels with the lock and COMMIT goes without a wait of its own (three round
        # trips, not four); each statement still waits for the one before it to answer.
        with self.conn.pipeline(), self.conn.transaction():
            if self.conn.execute(lock, (node.name, node.epoch)).fetchone() is None:
                return "gone" if wait else "locked"
            placed = self.conn.execute(
                _RESERVE,
                {
                    "id": demand.sandbox_id,
                    "node": node.name,
                    "epoch": node.epoch,
                    "vcpus": demand.vcpus,
                    "mem": demand.memory_mib,
                    "disk": demand.disk_mib,
                    "template": demand.template,
                    "ttl": self.reservation_s,
                    "detail": f"score={choice.score:.3f}",
                },
            ).fetchone()
            if placed is None:
                taken = self.conn.execute(_TAKEN, (demand.sandbox_id,)).fetchone()
                if taken is not None:
                    raise Conflict(
                        f"sandbox {demand.sandbox_id} is already placed ({taken[0]} on node {taken[1]}); "
                        "it cannot be placed twice"
                    )
                return "full"
        return Reservation(
            sandbox_id=demand.sandbox_id,
            node=node.name,
            address=node.address,
            epoch=node.epoch,
            expires_at=placed[0],
            score=choice.score,
            wake=bool(placed[1]),
        )

    @reports_outages
    def confirm(self, reservation: Reservation, *, as_id: str | None = None) -> None:
        """The agent runs it: the reservation becomes a running placement (under `as_id` when the agent
        named the sandbox). ReservationLost if it expired, was reclaimed, or its node's lease lapsed or
        epoch changed meanwhile (the caller must then stop the sandbox on that agent: the cluster no
        longer counts it there)."""
        sandbox_id = check_name("sandbox id", as_id) if as_id is not None else reservation.sandbox_id
        self._confirm(reservation.sandbox_id, reservation.node, reservation.epoch, sandbox_id)

    @reports_outages
    def confirm_wake(self, sandbox_id: str, node: str, epoch: int, detail: str = "") -> None:
        """The waking agent itself confirms, once the sandbox runs: only it knows when the guest is up,
        and it must stop the guest if the reservation was lost meanwhile (another node may wake it).
        `detail` goes into the audit event (what the wake cost)."""
        self._confirm(check_name("sandbox id", sandbox_id), node, epoch, sandbox_id, detail)

    def _confirm(self, reserved_as: str, node: str, epoch: int, sandbox_id: str, detail: str = "") -> None:
        # One statement (one round trip, atomic on its own): the placement runs, and its event.
        row = self.conn.execute(
            _CONFIRM,
            {
                "id": sandbox_id,
                "reserved_as": reserved_as,
                "node": node,
                "epoch": epoch,
                "detail": detail if sandbox_id == reserved_as else f"reserved as {reserved_as}",
            },
        ).fetchone()
        if row is not None:
            return
        events.record(self.conn, "confirm_refused", node=node, epoch=epoch, sandbox_id=reserved_as)
        raise ReservationLost(
            f"the reservation of sandbox {reserved_as} on node {node} "
            f"(epoch {epoch}) expired or its node was fenced before it was confirmed"
        )

    @reports_outages
    def release(self, reservation: Reservation, *, why: str = "released") -> None:
        """Give the capacity back (the agent refused or failed); a wake goes back to hibernated."""
        key = (reservation.sandbox_id, reservation.node, reservation.epoch)
        where = "sandbox_id = %s AND node = %s AND epoch = %s AND state = 'reserved'"
        with self.conn.transaction():
            self.conn.execute(
                "UPDATE cluster.placements SET state = 'hibernated', node = origin, origin = NULL, "
                f"reserved_until = NULL, updated_at = now() WHERE {where} AND origin IS NOT NULL",
                key,
            )
            self.conn.execute(f"DELETE FROM cluster.placements WHERE {where}", key)
            events.record(
                self.conn,
                "released",
                node=reservation.node,
                epoch=reservation.epoch,
                sandbox_id=reservation.sandbox_id,
                detail=why,
            )

    @reports_outages
    def hibernated(self, sandbox_id: str, node: str, epoch: int, capture: str) -> None:
        """Its state is in the object store as `capture`: it holds no capacity and may wake on any node
        (`node` stays as its origin, for the placement bonus)."""
        check_capture(capture)
        self._move(sandbox_id, node, epoch, PlacementState.RUNNING, PlacementState.HIBERNATED, capture)

    @reports_outages
    def wake_demand(self, sandbox_id: str) -> tuple[Demand, str]:
        """What waking a sandbox hibernated in the object store asks of a node, and its capture.
        Conflict when it is not (or no longer) hibernated there."""
        row = self.conn.execute(
            "SELECT node, vcpus, memory_mib, disk_mib, template, capture, state "
            "FROM cluster.placements WHERE sandbox_id = %s",
            (check_name("sandbox id", sandbox_id),),
        ).fetchone()
        if row is None:
            raise NotFound(f"sandbox {sandbox_id} is not placed on any node")
        if row[6] != PlacementState.HIBERNATED or row[5] is None:
            raise Conflict(f"sandbox {sandbox_id} is {row[6]}, not hibernated in the object store")
        demand = Demand(sandbox_id, int(row[1]), int(row[2]), int(row[3]), str(row[4]), origin=str(row[0]))
        return demand, str(row[5])

    @reports_outages
    def ended_stored(self, sandbox_id: str) -> str:
        """Deleted while hibernated in the object store (no node has it): its row goes; returns its
        capture. Conflict if a wake took it meanwhile (the delete must then go to that node)."""
        with self.conn.transaction():
            row = self.conn.execute(
                "DELETE FROM cluster.placements WHERE sandbox_id = %s AND state = 'hibernated' "
                "AND capture IS NOT NULL RETURNING node, capture",
                (check_name("sandbox id", sandbox_id),),
            ).fetchone()
            if row is None:
                raise Conflict(f"sandbox {sandbox_id} is not hibernated in the object store any more")
            events.record(self.conn, "ended", node=row[0], sandbox_id=sandbox_id, detail=f"capture {row[1]}")
        return str(row[1])

    @reports_outages
    def ended(self, sandbox_id: str, node: str, epoch: int) -> None:
        """Deleted: the sandbox id is free and the node's capacity comes back."""
        check_name("sandbox id", sandbox_id)
        with self.conn.transaction():
            gone = self.conn.execute(
                "DELETE FROM cluster.placements WHERE sandbox_id = %s AND node = %s AND epoch = %s "
                "AND state IN ('running', 'hibernated')",
                (sandbox_id, node, epoch),
            ).rowcount
            if not gone:
                raise NotFound(f"sandbox {sandbox_id} is not placed on node {node} (epoch {epoch})")
            events.record(self.conn, "ended", node=node, epoch=epoch, sandbox_id=sandbox_id)

    def _move(
        self,
        sandbox_id: str,
        node: str,
        epoch: int,
        old: PlacementState,
        new: PlacementState,
        capture: str | None = None,
    ) -> None:
        with self.conn.transaction():
            moved = self.conn.execute(
                "UPDATE cluster.placements SET state = %s, capture = %s, updated_at = now() "
                "WHERE sandbox_id = %s AND node = %s AND epoch = %s AND state = %s",
                (new.value, capture, sandbox_id, node, epoch, old.value),
            ).rowcount
            if not moved:
                raise Conflict(f"sandbox {sandbox_id} is not {old.value} on node {node} (epoch {epoch})")
            events.record(
                self.conn, new.value, node=node, epoch=epoch, sandbox_id=sandbox_id, detail=capture or ""
            )

    @reports_outages
    def locate(self, sandbox_id: str) -> Location:
        """Where a call for this sandbox goes; NotFound if it was never placed."""
        row = self.conn.execute(
            "SELECT p.node, n.address, p.epoch, p.state, n.state = 'up' AND n.lease_expires_at > now(), "
            "p.capture, p.origin IS NOT NULL AND p.state = 'reserved' AND p.reserved_until > now() "
            "FROM cluster.placements p JOIN cluster.nodes n ON n.name = p.node WHERE p.sandbox_id = %s",
            (sandbox_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"sandbox {sandbox_id} is not placed on any node")
        return Location(
            sandbox_id,
            row[0],
            row[1],
            int(row[2]),
            PlacementState(row[3]),
            bool(row[4]),
            capture=row[5],
            waking=bool(row[6]),
        )
