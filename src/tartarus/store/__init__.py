"""Durable state of the control plane: SQLite by default, PostgreSQL by URL (`TARTARUS_DATABASE_URL`)."""

from __future__ import annotations

import os
from pathlib import Path

from tartarus.store.database import Database, DatabaseBusy, DatabaseError
from tartarus.store.store import ApiKey, SandboxRow, Store, Tenant, default_url


def database_url(state_dir: Path) -> str:
    """TARTARUS_DATABASE_URL if set, else the SQLite file in the state directory."""
    return os.environ.get("TARTARUS_DATABASE_URL") or default_url(state_dir)


def open_store(state_dir: Path) -> Store:
    return Store.open(database_url(state_dir))


__all__ = [
    "ApiKey",
    "Database",
    "DatabaseBusy",
    "DatabaseError",
    "SandboxRow",
    "Store",
    "Tenant",
    "database_url",
    "default_url",
    "open_store",
]
