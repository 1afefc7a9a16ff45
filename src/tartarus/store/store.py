"""The control plane's durable records: tenants, API keys, sandboxes and the audit trail.

Plain methods over one `Database`; callers on an event loop run them in a worker thread.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tartarus.errors import InvalidArgument, NotFound
from tartarus.store import keys
from tartarus.store.database import Database, Row
from tartarus.store.migrations import migrate

TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
ROLES = ("admin", "user")
MAX_LIMIT = 1 << 30  # quota columns are 32-bit integers
# States after which a sandbox holds nothing on the host.
ENDED_STATES = ("destroyed", "failed", "lost")


@dataclass(frozen=True)
class Tenant:
    name: str
    created_at: float
    max_sandboxes: int | None = None
    max_vcpus: int | None = None
    max_memory_mib: int | None = None
    max_checkpoints: int | None = None


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant: str
    role: str
    description: str
    created_at: float
    revoked_at: float | None = None

    @property
    def admin(self) -> bool:
        return self.role == "admin"


@dataclass
class SandboxRow:
    id: str
    tenant: str
    node: str
    template: str
    state: str
    vcpus: int
    memory_mib: int
    created_at: float
    labels: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    timeout_s: float | None = None
    expires_at: float | None = None
    ended_at: float | None = None


_SANDBOX_COLUMNS = (
    "id, tenant, node, template, state, vcpus, memory_mib, created_at, labels, error, "
    "timeout_s, expires_at, ended_at"
)
_KEY_COLUMNS = "id, tenant, role, description, created_at, revoked_at"
_TENANT_COLUMNS = "name, created_at, max_sandboxes, max_vcpus, max_memory_mib, max_checkpoints"
_KEY_FIELDS = _KEY_COLUMNS.split(", ")
_CALLER = (
    f"SELECT {', '.join('k.' + c for c in _KEY_FIELDS)}, "
    f"{', '.join('t.' + c for c in _TENANT_COLUMNS.split(', '))} "
    "FROM api_keys k LEFT JOIN tenants t ON t.name = k.tenant WHERE k.key_hash = ? AND k.revoked_at IS NULL"
)


def _sandbox(row: Row) -> SandboxRow:
    values = list(row)
    values[8] = json.loads(values[8])
    return SandboxRow(*values)


def default_url(state_dir: Path) -> str:
    return f"sqlite://{(state_dir / 'tartarus.db').resolve()}"


def check_tenant_name(name: str) -> str:
    if not re.match(TENANT_PATTERN, name):
        raise InvalidArgument(
            f"tenant name {name!r} must be 1-63 lowercase letters, digits, '-' or '_', starting alphanumeric"
        )
    return name


class Store:
    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    def open(cls, url: str) -> Store:
        """Connect and migrate the schema to the latest version."""
        db = Database(url)
        try:
            migrate(db)
        except BaseException:
            db.close()
            raise
        return cls(db)

    def on_loop(self) -> Store | None:
        """A second store on the same SQLite file, for the key check and the new sandbox's row that
        every create makes, run on the event loop itself: a WAL reader never waits, an insert is one
        append to the WAL (synchronous=NORMAL: no fsync), so neither needs a hop to the store's thread;
        nothing is cached, so a revocation (this daemon's or `tartarus keys`'s) refuses the key at the
        next call. A statement that would wait for a lock raises DatabaseBusy at once instead. None for
        PostgreSQL: a network round trip stays off the loop."""
        if self.db.dialect != "sqlite":
            return None
        return Store(Database(self.db.url, on_loop=True))

    def close(self) -> None:
        self.db.close()

    def ping(self) -> None:
        """A trivial query: raises if the database does not answer (readiness)."""
        self.db.one("SELECT 1")

    # ---- tenants ----------------------------------------------------------------------------

    def ensure_tenant(self, name: str) -> Tenant:
        check_tenant_name(name)
        # One statement, not a read then an insert: stores sharing a database (cluster agents starting
        # together) may ensure the same tenant at once, and the later insert must not fail.
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO tenants (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                (name, time.time()),
            )
            tenant = self.get_tenant(name)
        assert tenant is not None
        return tenant

    def get_tenant(self, name: str) -> Tenant | None:
        row = self.db.one(f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE name = ?", (name,))
        return Tenant(*row) if row else None

    def list_tenants(self) -> list[Tenant]:
        return [Tenant(*r) for r in self.db.query(f"SELECT {_TENANT_COLUMNS} FROM tenants ORDER BY name")]

    def set_quota(
        self,
        name: str,
        *,
        max_sandboxes: int | None,
        max_vcpus: int | None,
        max_memory_mib: int | None,
        max_checkpoints: int | None = None,
    ) -> Tenant:
        """Set a tenant's limits (None: unlimited), creating the tenant if needed."""
        for what, value in (
            ("max_sandboxes", max_sandboxes),
            ("max_vcpus", max_vcpus),
            ("max_memory_mib", max_memory_mib),
            ("max_checkpoints", max_checkpoints),
        ):
            if value is not None and not 0 <= value <= MAX_LIMIT:
                raise InvalidArgument(f"{what} must be from 0 to {MAX_LIMIT}, not {value}")
        with self.db.transaction():
            self.ensure_tenant(name)
            self.db.execute(
                "UPDATE tenants SET max_sandboxes = ?, max_vcpus = ?, max_memory_mib = ?, "
                "max_checkpoints = ? WHERE name = ?",
                (max_sandboxes, max_vcpus, max_memory_mib, max_checkpoints, name),
            )
            tenant = self.get_tenant(name)
        assert tenant is not None
        return tenant

    # ---- API keys ---------------------------------------------------------------------------

    def create_key(self, tenant: str, *, role: str = "user", description: str = "") -> tuple[ApiKey, str]:
        """A new key for `tenant` (created if new). Returns the record and the secret, which is not kept."""
        if role not in ROLES:
            raise InvalidArgument(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        key_id, secret = keys.generate()
        record = ApiKey(key_id, tenant, role, description, time.time())
        with self.db.transaction():
            self.ensure_tenant(tenant)
            self.db.execute(
                "INSERT INTO api_keys (id, tenant, key_hash, role, description, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key_id, tenant, keys.digest(secret), role, description, record.created_at),
            )
        return record, secret

    def authenticate(self, secret: str) -> ApiKey | None:
        """The live (unrevoked) key with this secret, or None."""
        if not keys.well_formed(secret):
            return None
        row = self.db.one(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL",
            (keys.digest(secret),),
        )
        return ApiKey(*row) if row else None

    def caller(self, secret: str) -> tuple[ApiKey | None, Tenant | None]:
        """`authenticate` and the key's tenant (for its quota) in one statement."""
        if not keys.well_formed(secret):
            return None, None
        row = self.db.one(_CALLER, (keys.digest(secret),))
        if row is None:
            return None, None
        n = len(_KEY_FIELDS)
        return ApiKey(*row[:n]), Tenant(*row[n:]) if row[n] is not None else None

    def get_key(self, key_id: str) -> ApiKey | None:
        row = self.db.one(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
        return ApiKey(*row) if row else None

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        where, params = ("WHERE tenant = ?", (tenant,)) if tenant else ("", ())
        rows = self.db.query(f"SELECT {_KEY_COLUMNS} FROM api_keys {where} ORDER BY created_at", params)
        return [ApiKey(*r) for r in rows]

    def revoke_key(self, key_id: str) -> ApiKey:
        with self.db.transaction():
            key = self.get_key(key_id)
            if key is None:
                raise NotFound(f"no API key {key_id!r}")
            if key.revoked_at is None:
                self.db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (time.time(), key_id))
            key = self.get_key(key_id)
        assert key is not None
        return key

    # ---- sandboxes --------------------------------------------------------------------------

    def insert_sandbox(self, row: SandboxRow) -> None:
        self.db.execute(
            f"INSERT INTO sandboxes ({_SANDBOX_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.id,
                row.tenant,
                row.node,
                row.template,
                row.state,
                row.vcpus,
                row.memory_mib,
                row.created_at,
                json.dumps(row.labels, sort_keys=True),
                row.error,
                row.timeout_s,
                row.expires_at,
                row.ended_at,
            ),
        )

    def update_sandbox(self, id_: str, **fields: Any) -> None:
        allowed = {"state", "error", "timeout_s", "expires_at", "ended_at", "labels", "node"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"cannot update sandbox fields {sorted(set(fields) - allowed)}")
        if "labels" in fields:
            fields["labels"] = json.dumps(fields["labels"], sort_keys=True)
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self.db.execute(f"UPDATE sandboxes SET {assignments} WHERE id = ?", (*fields.values(), id_))

    def get_sandbox(self, id_: str) -> SandboxRow | None:
        row = self.db.one(f"SELECT {_SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?", (id_,))
        return _sandbox(row) if row else None

    def list_sandboxes(
        self, *, tenant: str | None = None, node: str | None = None, live: bool | None = None
    ) -> list[SandboxRow]:
        """Sandboxes, optionally of one tenant / node; live=True: not ended, False: ended only."""
        clauses: list[str] = []
        params: list[Any] = []
        if tenant is not None:
            clauses.append("tenant = ?")
            params.append(tenant)
        if node is not None:
            clauses.append("node = ?")
            params.append(node)
        if live is not None:
            marks = ", ".join("?" for _ in ENDED_STATES)
            clauses.append(f"state {'NOT IN' if live else 'IN'} ({marks})")
            params.extend(ENDED_STATES)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self.db.query(f"SELECT {_SANDBOX_COLUMNS} FROM sandboxes {where} ORDER BY created_at", params)
        return [_sandbox(r) for r in rows]

    def mark_lost(self, node: str, keep: set[str], reason: str) -> list[str]:
        """Mark this node's live sandboxes not in `keep` as lost (their VMM died with a previous daemon)."""
        with self.db.transaction():
            lost = [r.id for r in self.list_sandboxes(node=node, live=True) if r.id not in keep]
            now = time.time()
            for id_ in lost:
                self.update_sandbox(id_, state="lost", error=reason, ended_at=now)
        return lost

    # ---- audit ------------------------------------------------------------------------------

    def add_audit(
        self,
        action: str,
        *,
        ts: float,
        tenant: str | None = None,
        actor: str | None = None,
        target: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        self.db.execute(
            "INSERT INTO audit (ts, action, tenant, actor, target, status, request_id, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (ts, action, tenant, actor, target, status, request_id, json.dumps(detail or {}, default=str)),
        )

    def list_audit(self, *, tenant: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        where, params = ("WHERE tenant = ?", [tenant]) if tenant else ("", [])
        rows = self.db.query(
            "SELECT ts, action, tenant, actor, target, status, request_id, detail FROM audit "
            f"{where} ORDER BY id DESC LIMIT ?",
            [*params, limit],
        )
        names = ("ts", "action", "tenant", "actor", "target", "status", "request_id", "detail")
        return [{**dict(zip(names, r, strict=True)), "detail": json.loads(r[7])} for r in rows]
