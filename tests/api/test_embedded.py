"""`tartarus run`'s embedded daemon against a shared database: repeated runs reuse one node id and one
local admin key instead of adding a key (and a node) per run; concurrent runs never share a node."""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx
import pytest

from tartarus.daemon.server import embedded_daemon
from tartarus.store import ApiKey, open_store
from tests.api.conftest import backend_url, env


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str | None:
    return backend_url(request)


def _answers(uds: Path, key: str) -> bool:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(uds)), timeout=30) as c:
        return c.get("http://tartarus/v1/sandboxes", headers={"Authorization": f"Bearer {key}"}).is_success


def _local_keys(slot: Path) -> list[ApiKey]:
    store = open_store(slot)  # the slot's SQLite file, or TARTARUS_DATABASE_URL
    try:
        return store.list_keys("local")
    finally:
        store.close()


def _run_once(root: Path) -> tuple[str, str]:
    """One embedded run: (its node id, its admin key), after checking the key works."""
    with embedded_daemon(root) as uds:
        slot = root / "embedded" / "slot-0"
        key = (slot / "admin.key").read_text().strip()
        assert _answers(uds, key)
        return (slot / "node-id").read_text().strip(), key


def test_repeated_runs_reuse_node_and_admin_key(database: str | None, tmp_path: Path) -> None:
    slot = tmp_path / "embedded" / "slot-0"
    with env(TARTARUS_DATABASE_URL=database):
        runs = {_run_once(tmp_path) for _ in range(3)}
        assert len(runs) == 1, runs
        (key,) = _local_keys(slot)
        assert key.revoked_at is None

        # The key file lost (a wiped state dir on a shared database): a new key, the old one revoked.
        (slot / "admin.key").unlink()
        node, secret = _run_once(tmp_path)
        assert (node, secret) != runs.pop() and node == (slot / "node-id").read_text().strip()
        keys = _local_keys(slot)
        assert len(keys) == 2 and [k.id for k in keys if k.revoked_at is None] == [keys[-1].id]

        # The key revoked by an admin: replaced, still one live local key.
        store = open_store(slot)
        try:
            store.revoke_key(keys[-1].id)
        finally:
            store.close()
        _run_once(tmp_path)
        keys = _local_keys(slot)
        assert len(keys) == 3 and sum(k.revoked_at is None for k in keys) == 1


def test_concurrent_runs_take_separate_nodes(database: str | None, tmp_path: Path) -> None:
    with env(TARTARUS_DATABASE_URL=database), contextlib.ExitStack() as stack:
        first = stack.enter_context(embedded_daemon(tmp_path))
        second = stack.enter_context(embedded_daemon(tmp_path))
        slots = [tmp_path / "embedded" / f"slot-{n}" for n in (0, 1)]
        nodes = {(s / "node-id").read_text() for s in slots}
        assert len(nodes) == 2
        for uds, slot in zip((first, second), slots, strict=True):
            assert _answers(uds, (slot / "admin.key").read_text().strip())
