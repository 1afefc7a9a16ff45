"""Connections to the coordination database (PostgreSQL only: a cluster needs one shared server).

Each caller holds its own connection (a gateway thread, an agent's lease loop, the election): placement
correctness rests on row locks and transactions, never on sharing a connection between threads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import psycopg

from tartarus.cluster.errors import ClusterUnavailable
from tartarus.errors import InvalidArgument
from tartarus.store.database import redact

Connection = psycopg.Connection[tuple[Any, ...]]


def connect(url: str, *, timeout_s: float = 10, unacked_s: float | None = None) -> Connection:
    """An autocommit connection; callers group statements with `conn.transaction()`. `unacked_s`: a
    query whose bytes the server has not acknowledged for that long fails (TCP_USER_TIMEOUT), rather than
    waiting for TCP's retransmissions to give up (minutes) on a connection a partition cut."""
    if not url.startswith(("postgresql:", "postgres:")):
        raise InvalidArgument(
            f"the cluster database must be PostgreSQL (postgresql://...), not {redact(url)}"
        )
    try:
        options: dict[str, Any] = (
            {} if unacked_s is None else {"tcp_user_timeout": max(1, int(unacked_s * 1000))}
        )
        return psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout_s)), **options)
    except psycopg.Error as e:
        raise ClusterUnavailable(f"cannot reach the cluster database {redact(url)}: {e}") from e


P = ParamSpec("P")
R = TypeVar("R")


def reports_outages(fn: Callable[P, R]) -> Callable[P, R]:
    """A dropped connection or a restarting server surfaces as ClusterUnavailable (a 503 for a gateway),
    not as a driver exception; the transaction it interrupted was rolled back by the server."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except psycopg.OperationalError as e:
            raise ClusterUnavailable(f"the cluster database connection failed: {e}") from e

    return wrapper
