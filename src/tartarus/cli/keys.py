"""`tartarus keys` and `tartarus tenants`: API keys and quotas, managed on the daemon's own store.

These are operator commands on the daemon's host: they open the same database the daemon uses (the state
dir's SQLite file, or TARTARUS_DATABASE_URL), so they work whether or not the daemon is running. Remote
admins use the admin endpoints (/v1/keys, /v1/tenants) with an admin key instead.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from collections.abc import Iterator
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Column, Table

from tartarus import errors
from tartarus.paths import state_dir
from tartarus.store import Store, open_store

keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
tenants_app = typer.Typer(help="Manage tenants and their quotas.", no_args_is_help=True)
err = Console(stderr=True)


@contextlib.contextmanager
def _store() -> Iterator[Store]:
    try:
        store = open_store(state_dir())
    except errors.TartarusError as e:
        err.print(f"[red]error[/red] ({e.code}): {e.message}")
        raise typer.Exit(2) from e
    try:
        yield store
    except errors.TartarusError as e:
        err.print(f"[red]error[/red] ({e.code}): {e.message}")
        raise typer.Exit(2) from e
    finally:
        store.close()


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="the tenant the key acts for (created if new)")],
    admin: Annotated[bool, typer.Option("--admin", help="may manage other tenants, keys and quotas")] = False,
    description: Annotated[str, typer.Option(help="a note shown by `keys ls`")] = "",
) -> None:
    """Create an API key and print it: it is shown once, only its hash is stored."""
    with _store() as store:
        key, secret = store.create_key(tenant, role="admin" if admin else "user", description=description)
    err.print(
        f"created {key.id} ({key.role}) for tenant {key.tenant}; store the key now, it is not shown again:"
    )
    print(secret)


@keys_app.command("ls")
def keys_ls(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's keys")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List API keys (ids, never the keys themselves)."""
    with _store() as store:
        keys = store.list_keys(tenant)
    if as_json:
        print(json.dumps([k.__dict__ for k in keys], indent=2))
        return
    table = Table("TENANT", "ROLE", "CREATED", "REVOKED", "DESCRIPTION")
    table.columns.insert(0, Column("ID", no_wrap=True, min_width=16))
    for k in keys:
        table.add_row(k.id, k.tenant, k.role, _when(k.created_at), _when(k.revoked_at), k.description)
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_ids: Annotated[list[str], typer.Argument(help="key ids, as `keys ls` shows")]) -> None:
    """Revoke keys: requests with them fail from now on."""
    with _store() as store:
        for key_id in key_ids:
            store.revoke_key(key_id)
            err.print(f"revoked {key_id}")


@tenants_app.command("ls")
def tenants_ls() -> None:
    """List tenants and their quotas."""
    with _store() as store:
        tenants = store.list_tenants()
    table = Table("TENANT", "CREATED", "MAX SANDBOXES", "MAX VCPUS", "MAX MEMORY", "MAX CHECKPOINTS")
    for t in tenants:

        def fmt(v: int | None, unit: str = "") -> str:
            return "unlimited" if v is None else f"{v}{unit}"

        table.add_row(
            t.name,
            _when(t.created_at),
            fmt(t.max_sandboxes),
            fmt(t.max_vcpus),
            fmt(t.max_memory_mib, " MiB"),
            fmt(t.max_checkpoints),
        )
    Console().print(table)


@tenants_app.command("quota")
def tenants_quota(
    tenant: str,
    max_sandboxes: Annotated[int | None, typer.Option(min=0, help="concurrent sandboxes")] = None,
    max_vcpus: Annotated[int | None, typer.Option(min=0, help="vCPUs of all its sandboxes")] = None,
    max_memory_mib: Annotated[
        int | None, typer.Option(min=0, help="guest memory of all its sandboxes")
    ] = None,
    max_checkpoints: Annotated[int | None, typer.Option(min=0, help="checkpoints it keeps")] = None,
) -> None:
    """Set a tenant's quota (an option left out means unlimited); the next create, wake or checkpoint is
    checked against it."""
    with _store() as store:
        t = store.set_quota(
            tenant,
            max_sandboxes=max_sandboxes,
            max_vcpus=max_vcpus,
            max_memory_mib=max_memory_mib,
            max_checkpoints=max_checkpoints,
        )
    err.print(
        f"{t.name}: max_sandboxes={t.max_sandboxes} max_vcpus={t.max_vcpus} "
        f"max_memory_mib={t.max_memory_mib} max_checkpoints={t.max_checkpoints}"
    )
