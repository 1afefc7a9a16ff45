"""Who is calling: API keys in `Authorization: Bearer KEY`, and the local admin key file.

The daemon writes an admin key to `<state>/admin.key` (mode 0600) on first start, so whoever can read the
state directory (root, the daemon's user) drives the local daemon with no extra step; everyone else needs
a key from `tartarus keys create`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi.security import HTTPBearer

from tartarus.daemon.scoped import SandboxScope
from tartarus.errors import AuthError, PermissionDenied
from tartarus.paths import LOCAL_KEY_FILE
from tartarus.store import ApiKey, Store

log = logging.getLogger(__name__)

LOCAL_TENANT = "local"

# auto_error=False: we answer a missing key with our own error body, not FastAPI's.
bearer = HTTPBearer(auto_error=False, description="an API key from `tartarus keys create`")


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant: str
    admin: bool
    scope: SandboxScope | None = None  # a sandbox-scoped credential's (daemon/scoped.py): nothing beyond

    @classmethod
    def of(cls, key: ApiKey) -> Principal:
        return cls(key.id, key.tenant, key.admin)

    def require_admin(self) -> None:
        if not self.admin:
            raise PermissionDenied("this needs an admin key")


def missing_key() -> AuthError:
    return AuthError("an API key is required: send `Authorization: Bearer KEY` (see `tartarus keys create`)")


def invalid_key() -> AuthError:
    return AuthError("the API key is not valid (unknown or revoked)")


def read_key_file(path: Path) -> str | None:
    """The key in `path`, or None if it is absent or unreadable (not ours to read)."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def write_key_file(path: Path, secret: str) -> None:
    """Write a key readable only by its owner, atomically (never a half-written or world-readable file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, secret.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_local_admin_key(state_dir: Path, store: Store, node: str) -> Path:
    """Make sure `<state>/admin.key` holds a live admin key: the one there if it still works, else a new
    one, and then this node's earlier local keys are revoked (the file that held them is gone or they
    are revoked already), so a node has one live local key however often it starts."""
    path = state_dir / LOCAL_KEY_FILE
    current = read_key_file(path)
    if current is not None and store.authenticate(current) is not None:
        return path
    description = f"local admin key of {node}"
    key, secret = store.create_key(LOCAL_TENANT, role="admin", description=description)
    write_key_file(path, secret)
    log.info("wrote the local admin key %s to %s", key.id, path)
    for old in store.list_keys(LOCAL_TENANT):
        if old.id != key.id and old.description == description and old.revoked_at is None:
            store.revoke_key(old.id)
            log.info("revoked %s, an earlier local admin key of this node", old.id)
    return path
