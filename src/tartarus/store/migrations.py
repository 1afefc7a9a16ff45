"""Versioned schema migrations: each runs once, in order, recorded in `schema_migrations`.

Append new migrations to MIGRATIONS; never edit one that has shipped. `{serial}` becomes the dialect's
auto-incrementing integer key. A database migrated by a newer Tartarus is refused rather than guessed at.
"""

from __future__ import annotations

import time

from tartarus.store.database import Database, DatabaseError

_SERIAL = {"sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT", "postgresql": "BIGSERIAL PRIMARY KEY"}

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "tenants, api keys, sandboxes, audit",
        [
            """CREATE TABLE tenants (
                name TEXT PRIMARY KEY,
                created_at DOUBLE PRECISION NOT NULL,
                max_sandboxes INTEGER,
                max_vcpus INTEGER,
                max_memory_mib INTEGER
            )""",
            """CREATE TABLE api_keys (
                id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL REFERENCES tenants(name),
                key_hash TEXT NOT NULL UNIQUE,
                role TEXT NOT NULL CHECK (role IN ('admin', 'user')),
                description TEXT NOT NULL DEFAULT '',
                created_at DOUBLE PRECISION NOT NULL,
                revoked_at DOUBLE PRECISION
            )""",
            """CREATE TABLE sandboxes (
                id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL REFERENCES tenants(name),
                node TEXT NOT NULL,
                template TEXT NOT NULL,
                state TEXT NOT NULL,
                error TEXT,
                labels TEXT NOT NULL DEFAULT '{}',
                vcpus INTEGER NOT NULL,
                memory_mib INTEGER NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                timeout_s DOUBLE PRECISION,
                expires_at DOUBLE PRECISION,
                ended_at DOUBLE PRECISION
            )""",
            "CREATE INDEX sandboxes_tenant_state ON sandboxes (tenant, state)",
            "CREATE INDEX sandboxes_node_state ON sandboxes (node, state)",
            """CREATE TABLE audit (
                id {serial},
                ts DOUBLE PRECISION NOT NULL,
                action TEXT NOT NULL,
                tenant TEXT,
                actor TEXT,
                target TEXT,
                status INTEGER,
                request_id TEXT,
                detail TEXT NOT NULL DEFAULT '{}'
            )""",
            "CREATE INDEX audit_tenant_ts ON audit (tenant, ts)",
        ],
    ),
    (2, "tenant checkpoint quota", ["ALTER TABLE tenants ADD COLUMN max_checkpoints INTEGER"]),
]

LATEST = MIGRATIONS[-1][0]


def migrate(db: Database) -> list[int]:
    """Bring the schema to LATEST; returns the versions applied now. Safe against concurrent daemons."""
    with db.transaction():
        if db.dialect == "postgresql":
            # Serialise concurrent migrators (two daemons starting against one server).
            db.query("SELECT pg_advisory_xact_lock(7461)")
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
        )
        done = {int(r[0]) for r in db.query("SELECT version FROM schema_migrations")}
        if done and max(done) > LATEST:
            raise DatabaseError(
                f"the database schema is version {max(done)}, newer than this Tartarus knows ({LATEST}): "
                "upgrade Tartarus"
            )
        applied = []
        for version, name, statements in MIGRATIONS:
            if version in done:
                continue
            for sql in statements:
                db.execute(sql.replace("{serial}", _SERIAL[db.dialect]))
            db.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, time.time()),
            )
            applied.append(version)
        return applied
