"""One reconciler at a time: a PostgreSQL session advisory lock held on a dedicated connection.

No home-made consensus: the lock belongs to the database session, so when the holder dies, is partitioned
long enough for the server to drop its connection, or is terminated, PostgreSQL releases it and the next
gateway's `try_acquire` wins. A holder checks `holding()` before each pass, since its own connection may
have been cut without it noticing.
"""

from __future__ import annotations

import hashlib

import psycopg

from tartarus.cluster.db import Connection, connect

_NAMESPACE = 7463  # the first int4 of the two-key advisory lock: Tartarus cluster elections


def _key(name: str) -> int:
    """A stable int4 for an election name (advisory locks are keyed by integers)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big", signed=True)


class Election:
    """Campaign for `name` (e.g. "reconciler") on its own connection to `url`."""

    def __init__(self, url: str, name: str = "reconciler") -> None:
        self.url = url
        self.name = name
        self.key = _key(name)
        self._conn: Connection | None = None

    def try_acquire(self) -> bool:
        """Take the lock if free (non-blocking); True while this session holds it."""
        if self.holding():
            return True
        self._drop()
        self._conn = connect(self.url)
        row = self._conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (_NAMESPACE, self.key)).fetchone()
        return bool(row and row[0])

    def holding(self) -> bool:
        """Ask the server whether this session still holds the lock (False if the session is gone)."""
        if self._conn is None or self._conn.closed:
            return False
        try:
            row = self._conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = pg_backend_pid() AND classid = %s::int::oid AND objid = %s::int::oid "
                "AND objsubid = 2)",
                (_NAMESPACE, self.key),
            ).fetchone()
        except psycopg.Error:
            self._drop()
            return False
        return bool(row and row[0])

    @property
    def backend_pid(self) -> int | None:
        """The server process of this session (what pg_terminate_backend takes), if connected."""
        return None if self._conn is None or self._conn.closed else int(self._conn.info.backend_pid)

    def release(self) -> None:
        """Give the lock up (closing the session releases it)."""
        self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
