"""The `cluster` schema in PostgreSQL and its versioned migrations.

A schema of its own rather than more entries in tartarus.store.migrations: these tables exist only in
PostgreSQL (a single host on SQLite never creates them), they use PostgreSQL types (arrays, timestamptz,
the database clock) the store's two-dialect migrations avoid, and their version line moves independently,
so a gateway that adds a cluster table never makes a single-host daemon refuse a "newer" store schema.

Times are `timestamptz` set from `now()`: leases and reservations are judged by the one clock every node
and gateway shares (the database's), never by a host's own.
"""

from __future__ import annotations

from tartarus.cluster.db import Connection
from tartarus.cluster.errors import ClusterUnavailable

_LOCK = 7462  # pg_advisory_xact_lock key serialising concurrent migrators (the store uses 7461)

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "nodes, placements, events",
        [
            """CREATE TABLE cluster.nodes (
                name TEXT PRIMARY KEY,
                address TEXT NOT NULL,
                epoch BIGINT NOT NULL CHECK (epoch > 0),
                state TEXT NOT NULL CHECK (state IN ('up', 'lost')),
                admin TEXT NOT NULL DEFAULT 'active' CHECK (admin IN ('active', 'cordoned', 'draining')),
                vcpus INTEGER NOT NULL CHECK (vcpus >= 0),
                memory_mib BIGINT NOT NULL CHECK (memory_mib >= 0),
                disk_mib BIGINT NOT NULL CHECK (disk_mib >= 0),
                slots INTEGER NOT NULL CHECK (slots >= 0),
                labels TEXT[] NOT NULL DEFAULT '{}',
                templates TEXT[] NOT NULL DEFAULT '{}',
                registered_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                lease_expires_at TIMESTAMPTZ NOT NULL,
                lost_at TIMESTAMPTZ
            )""",
            # Where each sandbox lives. One row per sandbox id: a sandbox can never be placed on two nodes.
            """CREATE TABLE cluster.placements (
                sandbox_id TEXT PRIMARY KEY,
                node TEXT NOT NULL REFERENCES cluster.nodes(name),
                epoch BIGINT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('reserved', 'running', 'hibernated', 'lost')),
                origin TEXT,
                vcpus INTEGER NOT NULL,
                memory_mib BIGINT NOT NULL,
                disk_mib BIGINT NOT NULL,
                template TEXT NOT NULL,
                reserved_until TIMESTAMPTZ,
                created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )""",
            "CREATE INDEX placements_node_state ON cluster.placements (node, state)",
            # The audit trail of every placement and fencing decision.
            """CREATE TABLE cluster.events (
                id BIGSERIAL PRIMARY KEY,
                at TIMESTAMPTZ NOT NULL DEFAULT now(),
                kind TEXT NOT NULL,
                node TEXT,
                epoch BIGINT,
                sandbox_id TEXT,
                detail TEXT NOT NULL DEFAULT ''
            )""",
            "CREATE INDEX events_node_at ON cluster.events (node, at)",
        ],
    ),
    (
        2,
        "placements.capture",
        # A hibernated sandbox's capture in the object store: set, the sandbox wakes on any node.
        ["ALTER TABLE cluster.placements ADD COLUMN capture TEXT"],
    ),
    (
        3,
        "checkpoints",
        # A checkpoint whose capture is in the object store: any node may start sandboxes from it.
        [
            """CREATE TABLE cluster.checkpoints (
                id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL,
                sandbox_id TEXT NOT NULL,
                template TEXT NOT NULL,
                node TEXT NOT NULL,
                capture TEXT NOT NULL,
                vcpus INTEGER NOT NULL,
                memory_mib BIGINT NOT NULL,
                captured_at DOUBLE PRECISION NOT NULL,
                disk_bytes BIGINT NOT NULL,
                ttl_s DOUBLE PRECISION,
                created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                used_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )""",
            "CREATE INDEX checkpoints_tenant ON cluster.checkpoints (tenant)",
        ],
    ),
]

LATEST = MIGRATIONS[-1][0]


def migrate(conn: Connection) -> list[int]:
    """Bring the `cluster` schema to LATEST; returns the versions applied now. Safe against concurrency."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        conn.execute("CREATE SCHEMA IF NOT EXISTS cluster")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS cluster.schema_migrations ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        done = {int(r[0]) for r in conn.execute("SELECT version FROM cluster.schema_migrations")}
        if done and max(done) > LATEST:
            raise ClusterUnavailable(
                f"the cluster schema is version {max(done)}, newer than this Tartarus knows ({LATEST}): "
                "upgrade Tartarus"
            )
        applied = []
        for version, name, statements in MIGRATIONS:
            if version in done:
                continue
            for sql in statements:
                conn.execute(sql.encode())
            conn.execute(
                "INSERT INTO cluster.schema_migrations (version, name) VALUES (%s, %s)", (version, name)
            )
            applied.append(version)
        return applied
