"""One database connection, SQLite or PostgreSQL, behind the same small interface.

Queries are written once with `?` placeholders; for PostgreSQL they become `%s`. The store is used from a
single thread at a time (the daemon funnels it through one worker thread), so one connection suffices.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tartarus.errors import InvalidArgument, TartarusError

Row = tuple[Any, ...]
log = logging.getLogger(__name__)


class DatabaseError(TartarusError):
    code = "database_error"
    status = 503


class DatabaseBusy(DatabaseError):
    """A connection made for the event loop found the database locked (another connection writing,
    WAL recovery): it never waits, and the caller retries on the store's own thread."""


class Database:
    """A connection plus its dialect; `transaction()` groups statements atomically. `on_loop`: a
    second SQLite connection for single statements made on the event loop (see `Store.on_loop`)."""

    dialect: str

    def __init__(self, url: str, *, on_loop: bool = False) -> None:
        self.url = url
        self.on_loop = on_loop
        self._depth = 0
        scheme = urlsplit(url).scheme
        if scheme == "sqlite":
            self.dialect = "sqlite"
        elif scheme in ("postgresql", "postgres"):
            self.dialect = "postgresql"
        else:
            raise InvalidArgument(f"database URL must be sqlite:///PATH or postgresql://..., not {url!r}")
        self._conn: Any = None
        self._connect()

    def _connect(self) -> None:
        try:
            if self.dialect == "sqlite":
                path = Path(self.url.removeprefix("sqlite://"))
                path.parent.mkdir(parents=True, exist_ok=True)
                # Owner-only before SQLite opens it: its -wal and -shm files take the database's mode.
                path.touch(mode=0o600, exist_ok=True)
                path.chmod(0o600)
                # isolation_level=None: we issue BEGIN/COMMIT ourselves.
                # On the event loop: never wait for a lock (DatabaseBusy at once: a WAL reader never
                # needs to, a writer only when another connection writes) and never checkpoint (the
                # checkpoint's fsyncs happen on the store's own connection, on its thread).
                timeout = 0 if self.on_loop else 30
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=timeout)
                if self.on_loop:
                    conn.execute("PRAGMA wal_autocheckpoint=0")
                else:
                    conn.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode: a commit survives the process being killed (-9), only a power loss
                # can drop the last transactions; FULL would add an fsync to every API call.
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA foreign_keys=ON")
                self._conn = conn
            else:
                import psycopg

                self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except Exception as e:
            raise DatabaseError(f"cannot open the database {redact(self.url)}: {e}") from e

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgresql" else sql

    def _run(self, sql: str, params: Sequence[Any]) -> Any:
        """Execute, reconnecting once if a PostgreSQL server dropped us between transactions."""
        if any(isinstance(p, str) and "\x00" in p for p in params):
            # PostgreSQL cannot store NUL in text; refuse it the same way on both stores.
            raise InvalidArgument("text containing NUL (\\x00) characters cannot be stored")
        try:
            return self._conn.execute(self._sql(sql), tuple(params))
        except sqlite3.OperationalError as e:
            if self.on_loop:
                raise DatabaseBusy(f"the database is busy: {e}") from e
            raise
        except Exception as e:
            if not self._lost(e) or self._depth:
                raise
            log.warning("lost the database connection (%s); reconnecting", e)
            self.close()
            self._connect()
            return self._conn.execute(self._sql(sql), tuple(params))

    def _lost(self, exc: Exception) -> bool:
        if self.dialect != "postgresql":
            return False
        import psycopg

        return isinstance(exc, psycopg.OperationalError) and bool(self._conn.closed)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        return int(self._run(sql, params).rowcount)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [tuple(r) for r in self._run(sql, params).fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN ... COMMIT (ROLLBACK on error); nested calls join the outer transaction."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        # IMMEDIATE: take SQLite's write lock up front so read-then-write never hits SQLITE_BUSY midway.
        self._run("BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN", ())
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            self._conn.execute("ROLLBACK")
            raise
        self._depth = 0
        self._conn.execute("COMMIT")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()
