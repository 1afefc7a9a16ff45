"""The durable store against both databases it supports: a SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tartarus.errors import InvalidArgument, NotFound
from tartarus.store import DatabaseBusy, DatabaseError, SandboxRow, Store, migrations
from tartarus.store.database import Database
from tartarus.store.migrations import LATEST, migrate


def _row(id_: str, tenant: str = "acme", node: str = "n1", state: str = "running") -> SandboxRow:
    return SandboxRow(id_, tenant, node, "python-ds", state, 2, 512, time.time(), labels={"team": "ml"})


def test_migrations_run_once_and_are_recorded(database_url: str) -> None:
    db = Database(database_url)
    try:
        assert migrate(db) == [1, 2]
        assert migrate(db) == []
        assert db.query("SELECT version FROM schema_migrations ORDER BY version") == [(1,), (LATEST,)]
    finally:
        db.close()


def test_a_version_1_database_gains_the_checkpoint_quota_and_keeps_its_tenants(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(database_url)
    try:
        with monkeypatch.context() as m:  # the code as it shipped with schema version 1
            m.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:1])
            m.setattr(migrations, "LATEST", 1)
            assert migrate(db) == [1]
        db.execute("INSERT INTO tenants (name, created_at, max_sandboxes) VALUES ('old', 1.0, 4)")
        assert migrate(db) == [2]
    finally:
        db.close()
    store = Store.open(database_url)
    try:
        old = store.get_tenant("old")
        assert old is not None and old.max_sandboxes == 4 and old.max_checkpoints is None
    finally:
        store.close()


def test_a_schema_newer_than_the_code_is_refused(database_url: str) -> None:
    Store.open(database_url).close()
    db = Database(database_url)
    db.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'future', 0)")
    db.close()
    with pytest.raises(DatabaseError, match="newer"):
        Store.open(database_url)


def test_keys_are_stored_as_hashes_and_revocation_sticks(database_url: str) -> None:
    store = Store.open(database_url)
    try:
        key, secret = store.create_key("acme", role="admin", description="ops")
        assert secret.startswith("tartarus_") and len(secret) > 40
        stored = store.db.query("SELECT key_hash FROM api_keys")
        assert secret not in repr(stored)  # only the digest is kept
        if database_url.startswith("sqlite://"):
            for f in Path(database_url.removeprefix("sqlite://")).parent.glob("tartarus.db*"):
                assert f.stat().st_mode & 0o077 == 0, f"{f} is readable by others"
        found = store.authenticate(secret)
        assert found is not None and found.id == key.id and found.admin and found.tenant == "acme"
        assert store.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
        assert store.authenticate("not-a-key") is None
        assert store.revoke_key(key.id).revoked_at is not None
        assert store.authenticate(secret) is None
        with pytest.raises(NotFound):
            store.revoke_key("key-missing")
    finally:
        store.close()


def test_records_survive_reopening(database_url: str) -> None:
    store = Store.open(database_url)
    store.create_key("acme")
    store.insert_sandbox(_row("sb-1"))
    store.close()
    store = Store.open(database_url)
    try:
        row = store.get_sandbox("sb-1")
        assert row is not None and row.labels == {"team": "ml"} and row.state == "running"
        assert [k.tenant for k in store.list_keys()] == ["acme"]
    finally:
        store.close()


def test_mark_lost_touches_only_this_nodes_live_sandboxes(database_url: str) -> None:
    store = Store.open(database_url)
    try:
        store.ensure_tenant("acme")
        for row in (_row("sb-1"), _row("sb-2"), _row("sb-3", node="n2"), _row("sb-4", state="destroyed")):
            store.insert_sandbox(row)
        assert store.mark_lost("n1", keep={"sb-2"}, reason="daemon restarted") == ["sb-1"]
        lost = store.get_sandbox("sb-1")
        assert (
            lost is not None and lost.state == "lost" and lost.ended_at and lost.error == "daemon restarted"
        )
        assert [r.id for r in store.list_sandboxes(live=True)] == ["sb-2", "sb-3"]
        assert [r.id for r in store.list_sandboxes(tenant="acme", node="n1", live=False)] == ["sb-1", "sb-4"]
    finally:
        store.close()


def test_quotas_and_tenant_names_are_validated(database_url: str) -> None:
    store = Store.open(database_url)
    try:
        tenant = store.set_quota("acme", max_sandboxes=3, max_vcpus=None, max_memory_mib=4096)
        assert (tenant.max_sandboxes, tenant.max_vcpus, tenant.max_memory_mib) == (3, None, 4096)
        assert tenant.max_checkpoints is None
        tenant = store.set_quota(
            "acme", max_sandboxes=None, max_vcpus=None, max_memory_mib=None, max_checkpoints=5
        )
        assert store.get_tenant("acme") == tenant and tenant.max_checkpoints == 5
        with pytest.raises(InvalidArgument):
            store.set_quota("acme", max_sandboxes=-1, max_vcpus=None, max_memory_mib=None)
        with pytest.raises(InvalidArgument, match="max_checkpoints"):
            store.set_quota(
                "acme", max_sandboxes=None, max_vcpus=None, max_memory_mib=None, max_checkpoints=-1
            )
        with pytest.raises(InvalidArgument, match="tenant name"):
            store.ensure_tenant("Bad Name")
        with pytest.raises(InvalidArgument, match="role"):
            store.create_key("acme", role="root")
    finally:
        store.close()


def test_a_failed_transaction_leaves_nothing(database_url: str) -> None:
    store = Store.open(database_url)
    try:
        with pytest.raises(RuntimeError), store.db.transaction():
            store.ensure_tenant("acme")
            raise RuntimeError("boom")
        assert store.get_tenant("acme") is None
    finally:
        store.close()


def test_audit_rows_round_trip(database_url: str) -> None:
    store = Store.open(database_url)
    try:
        store.add_audit("sandbox.create", ts=1.0, tenant="acme", actor="key-1", target="sb-1", status=201)
        store.add_audit("sandbox.delete", ts=2.0, tenant="other", detail={"why": "test"})
        assert [a["action"] for a in store.list_audit()] == ["sandbox.delete", "sandbox.create"]
        (only,) = store.list_audit(tenant="other")
        assert only["detail"] == {"why": "test"}
    finally:
        store.close()


def test_store_reconnects_after_the_postgresql_server_restarts() -> None:
    from tests.pg import fresh_database, postgres_server, restart

    with postgres_server() as server:
        url = fresh_database(server, "reconnect")
        store = Store.open(url)
        try:
            store.ensure_tenant("acme")
            restart(server)
            assert store.get_tenant("acme") is not None  # one retry on a fresh connection
        finally:
            store.close()


def test_text_with_nul_is_refused_alike_on_both_stores(database_url: str) -> None:
    store = Store.open(database_url)
    try:
        with pytest.raises(InvalidArgument, match="NUL"):
            store.create_key("acme", description="bad\x00description")
        assert store.list_keys() == []  # nothing half-written
    finally:
        store.close()


def test_stores_opened_at_once_create_the_same_tenant_without_conflict(database_url: str) -> None:
    """Three agents starting together on a fresh shared store each ensure the `local` tenant (their admin
    keys'); none may fail on the others' insert."""
    Store.open(database_url).close()  # migrated once, as the first agent would
    stores = [Store.open(database_url) for _ in range(6)]
    barrier = threading.Barrier(len(stores))

    def ensure(store: Store) -> str:
        barrier.wait()
        return store.ensure_tenant("local").name

    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            for _ in range(5):
                assert list(pool.map(ensure, stores)) == ["local"] * len(stores)
                stores[0].db.execute("DELETE FROM tenants WHERE name = ?", ("local",))
    finally:
        for store in stores:
            store.close()


def test_a_key_and_its_tenant_come_in_one_lookup(database_url: str) -> None:
    store = Store.open(database_url)
    try:
        key, secret = store.create_key("acme")
        store.set_quota("acme", max_sandboxes=3, max_vcpus=None, max_memory_mib=None)
        found, tenant = store.caller(secret)
        assert found == key and tenant is not None
        assert (tenant.name, tenant.max_sandboxes, tenant.max_vcpus) == ("acme", 3, None)
        assert store.caller("tartarus_" + "A" * 43) == (None, None)
        assert store.caller("not-a-key") == (None, None)
        store.revoke_key(key.id)
        assert store.caller(secret) == (None, None)
    finally:
        store.close()


def test_the_event_loop_store_sees_revocations_at_once_and_never_waits_for_a_lock(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'tartarus.db'}"
    store = Store.open(url)
    fast = store.on_loop()
    other = Store.open(url)  # another process's connection (`tartarus keys revoke`)
    try:
        assert fast is not None
        key, secret = store.create_key("acme")
        assert fast.caller(secret)[0] == key
        other.revoke_key(key.id)
        assert fast.caller(secret) == (None, None)  # nothing cached: the next check refuses it
        fast.insert_sandbox(_row("sb-fast"))
        assert store.get_sandbox("sb-fast") is not None  # committed for every other connection
        with other.db.transaction():  # another connection holds the write lock
            other.db.execute("UPDATE tenants SET max_sandboxes = 1 WHERE name = 'acme'")
            started = time.monotonic()
            with pytest.raises(DatabaseBusy):
                fast.insert_sandbox(_row("sb-busy"))
            assert time.monotonic() - started < 1  # at once, not after the store's 30 s busy wait
            assert fast.caller("tartarus_" + "A" * 43) == (None, None)  # reads never wait
        assert store.get_sandbox("sb-busy") is None
    finally:
        for s in (fast, other, store):
            if s is not None:
                s.close()


def test_postgresql_stores_have_no_event_loop_store(database_url: str) -> None:
    store = Store.open(database_url)
    fast = store.on_loop()
    try:
        assert (fast is None) == database_url.startswith("postgresql")
    finally:
        if fast is not None:
            fast.close()
        store.close()
