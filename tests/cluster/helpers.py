"""Simulated nodes for the placement tests: rows registered as an agent would, with no agent behind them.

Placement and membership are database logic; exercising them at the scale of many nodes and hundreds of
concurrent placements needs no VM. The tests that a placed sandbox really runs belong to the roles round.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tartarus.cluster.db import Connection
from tartarus.cluster.membership import Membership
from tartarus.cluster.model import Demand, NodeSpec, Registration, Resources

ROOMY = Resources(vcpus=64, memory_mib=65536, disk_mib=100_000, slots=50)


def register(
    conn: Connection,
    name: str,
    *,
    capacity: Resources = ROOMY,
    labels: frozenset[str] = frozenset(),
    templates: frozenset[str] = frozenset(),
    lease_s: float = 30,
    running: tuple[str, ...] = (),
) -> Registration:
    spec = NodeSpec(name, f"10.0.0.1:{7000 + len(name)}", capacity, labels, templates)
    return Membership(conn, lease_s=lease_s).register(spec, running)


def demand(sandbox_id: str, **kw: object) -> Demand:
    base: dict[str, object] = {"vcpus": 1, "memory_mib": 256, "disk_mib": 0, "template": "python-ds"}
    return Demand(sandbox_id=sandbox_id, **{**base, **kw})  # type: ignore[arg-type]


def db_now(conn: Connection) -> float:
    row = conn.execute("SELECT extract(epoch FROM now())").fetchone()
    assert row is not None
    return float(row[0])


def wait_db_clock_past(conn: Connection, when: float, timeout: float = 10) -> None:
    """Wait until the database's clock passes `when` (leases are judged by it, not by ours)."""
    deadline = time.monotonic() + timeout
    while db_now(conn) <= when:
        if time.monotonic() > deadline:
            raise AssertionError("the database clock did not advance")
        time.sleep(0.05)


def until(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
