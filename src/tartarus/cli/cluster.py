"""`tartarus agent`, `tartarus gateway`, `tartarus nodes`: running and operating a cluster (docs/cluster.md).

Both roles and the `nodes` commands use TARTARUS_DATABASE_URL (PostgreSQL) for coordination and the
store of keys and tenants; agents and gateways share the agent token (TARTARUS_AGENT_TOKEN or a file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from tartarus import errors
from tartarus.paths import state_dir

if TYPE_CHECKING:
    from tartarus.cluster.membership import Membership

nodes_app = typer.Typer(
    help="Inspect and operate the cluster's nodes (TARTARUS_DATABASE_URL).", no_args_is_help=True
)
err = Console(stderr=True)


def _fail(e: errors.TartarusError) -> typer.Exit:
    err.print(f"[red]error[/red] ({e.code}): {e.message}")
    return typer.Exit(2)


def _database_url() -> str:
    url = os.environ.get("TARTARUS_DATABASE_URL", "")
    if not url.startswith(("postgresql:", "postgres:")):
        raise errors.InvalidArgument(
            "a cluster needs TARTARUS_DATABASE_URL set to a PostgreSQL database (postgresql://...)"
        )
    return url


def agent(
    host: Annotated[
        str, typer.Option(help="listen on this address (the cluster's private network)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8701,
    advertise: Annotated[
        str | None, typer.Option(help="host:port gateways reach (default: host:port)")
    ] = None,
    name: Annotated[str | None, typer.Option(help="node name (default: the state dir's node id)")] = None,
    label: Annotated[list[str] | None, typer.Option(help="node label, e.g. quarantine; repeat")] = None,
    slots: Annotated[int, typer.Option(help="sandboxes at most")] = 64,
    vcpus: Annotated[int | None, typer.Option(help="vCPUs to offer (default: the host's)")] = None,
    memory_mib: Annotated[int | None, typer.Option(help="memory to offer (default: the host's)")] = None,
    disk_mib: Annotated[
        int | None, typer.Option(help="disk to offer (default: free under the state dir)")
    ] = None,
    lease: Annotated[float, typer.Option(help="lease seconds (renewed every third of it)")] = 10.0,
    token_file: Annotated[Path | None, typer.Option(help="file holding the agent token")] = None,
    log_format: Annotated[str, typer.Option(help="json or text")] = "json",
    keep_sandboxes: Annotated[bool, typer.Option(help="on SIGTERM leave running sandboxes running")] = False,
) -> None:
    """Run a node agent: this host's sandboxes, served only to gateways holding the agent token. With
    TARTARUS_S3_ENDPOINT, _BUCKET, _ACCESS_KEY and _SECRET_KEY set, hibernations go to that object store
    and wake on any node."""
    from tartarus.cluster.model import NodeSpec, Resources
    from tartarus.daemon import logs
    from tartarus.daemon.control import node_id
    from tartarus.roles.agent import AgentOptions, held_templates, host_capacity, serve_agent
    from tartarus.roles.stored import s3_from_env
    from tartarus.roles.token import load_token

    logs.configure(log_format)
    try:
        state = state_dir()
        found = host_capacity(state, slots)
        capacity = Resources(
            vcpus or found.vcpus, memory_mib or found.memory_mib, disk_mib or found.disk_mib, slots
        )
        spec = NodeSpec(
            name=name or node_id(state),
            address=advertise or f"{host}:{port}",
            capacity=capacity,
            labels=frozenset(label or ()),
            templates=held_templates(),
        )
        options = AgentOptions(
            host, port, spec, _database_url(), load_token(token_file), lease, keep_sandboxes, s3_from_env()
        )
        serve_agent(state, options)
    except errors.TartarusError as e:
        raise _fail(e) from e


def gateway(
    host: Annotated[str, typer.Option(help="listen on this address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8700,
    token_file: Annotated[Path | None, typer.Option(help="file holding the agent token")] = None,
    grace: Annotated[float, typer.Option(help="seconds past a lapsed lease before a node is lost")] = 30.0,
    log_format: Annotated[str, typer.Option(help="json or text")] = "json",
) -> None:
    """Run a gateway: the public API (keys, tenants), placement, and proxying to the agents. With
    TARTARUS_POLICY set (the agents' policy file), a create its rules quarantine goes only to nodes
    labelled quarantine, and one they reject is refused here."""
    from tartarus.daemon import logs
    from tartarus.policy import load_policy
    from tartarus.roles.gateway import GatewayOptions, serve_gateway
    from tartarus.roles.token import load_token

    logs.configure(log_format)
    try:
        options = GatewayOptions(host, port, _database_url(), load_token(token_file), grace_s=grace)
        if policy := os.environ.get("TARTARUS_POLICY"):  # the rules' verdicts place quarantined sandboxes
            options = dataclasses.replace(options, policy=load_policy(Path(policy)))
        serve_gateway(options)
    except errors.TartarusError as e:
        raise _fail(e) from e


@contextlib.contextmanager
def _membership() -> Iterator[Membership]:
    from tartarus.cluster.db import connect
    from tartarus.cluster.membership import Membership

    try:
        with connect(_database_url()) as conn:
            yield Membership(conn)
    except errors.TartarusError as e:
        raise _fail(e) from e


@nodes_app.command("ls")
def nodes_ls(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The nodes: state, admin state, lease, capacity used."""
    with _membership() as m:
        nodes = m.nodes()
    if as_json:
        rows = [
            {
                "name": n.name,
                "address": n.address,
                "epoch": n.epoch,
                "state": n.state.value,
                "admin": n.admin.value,
                "healthy": n.healthy,
                "labels": sorted(n.labels),
                "capacity": vars(n.capacity),
                "used": vars(n.used),
                "lease_expires_at": n.lease_expires_at.isoformat(),
            }
            for n in nodes
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("NAME", "ADDRESS", "EPOCH", "STATE", "ADMIN", "SANDBOXES", "VCPUS", "MEMORY MiB", "LABELS")
    for n in nodes:
        state = n.state.value if n.healthy or n.state.value == "lost" else "lapsed"
        table.add_row(
            n.name,
            n.address,
            str(n.epoch),
            state,
            n.admin.value,
            f"{n.used.slots}/{n.capacity.slots}",
            f"{n.used.vcpus}/{n.capacity.vcpus}",
            f"{n.used.memory_mib}/{n.capacity.memory_mib}",
            ",".join(sorted(n.labels)),
        )
    Console().print(table)


@nodes_app.command("cordon")
def nodes_cordon(name: str) -> None:
    """No new sandboxes on the node; those it runs keep running."""
    from tartarus.cluster.model import Admin

    with _membership() as m:
        m.set_admin(name, Admin.CORDONED)
    typer.echo(f"{name} cordoned")


@nodes_app.command("uncordon")
def nodes_uncordon(name: str) -> None:
    """The node takes new sandboxes again."""
    from tartarus.cluster.model import Admin

    with _membership() as m:
        m.set_admin(name, Admin.ACTIVE)
    typer.echo(f"{name} active")


@nodes_app.command("drain")
def nodes_drain(
    name: str,
    token_file: Annotated[Path | None, typer.Option(help="file holding the agent token")] = None,
) -> None:
    """No new sandboxes on the node, and hibernate those it runs into the object store, so that their
    next call wakes them on another node (an agent without an object store hibernates them on its own
    disk: they wake on that node)."""
    import httpx

    from tartarus.roles.caller import CALLER_HEADER
    from tartarus.roles.token import load_token

    try:
        token = load_token(token_file)
    except errors.TartarusError as e:
        raise _fail(e) from e
    with _membership() as m:
        running = m.drain(name)
        address = m.node(name).address
    headers = {"authorization": token.header, CALLER_HEADER: "nodes-drain local admin"}
    failed = 0
    with httpx.Client(base_url=f"http://{address}", headers=headers, timeout=300) as agent:
        for sandbox_id in running:
            try:
                answer = agent.post(f"/v1/cluster/hibernate/{sandbox_id}")
            except httpx.HTTPError as e:
                err.print(f"{sandbox_id}: node {name} did not answer: {e}")
                failed += 1
                continue
            if answer.status_code == 200 and answer.json()["capture"]:
                typer.echo(f"{sandbox_id} hibernated into the object store ({answer.json()['capture']})")
            elif answer.status_code == 200 and not answer.json()["object_store"]:
                typer.echo(f"{sandbox_id} hibernated on {name} only (its agent has no object store)")
            elif answer.status_code == 200:
                err.print(f"{sandbox_id}: hibernated on {name}, but its upload failed (see the agent's log)")
                failed += 1
            else:
                err.print(f"{sandbox_id}: {answer.status_code} {answer.text[:200]}")
                failed += 1
    typer.echo(f"{name} draining: {len(running) - failed} of {len(running)} sandboxes hibernated")
    if failed:
        raise typer.Exit(1)


@nodes_app.command("collect")
def nodes_collect(
    grace: Annotated[
        float, typer.Option(help="seconds: only what is older goes (at least 2 x 12 h when uploads may run)")
    ] = 24 * 3600.0,
) -> None:
    """Delete from the object store (TARTARUS_S3_*) the captures no stored sandbox or checkpoint names
    any more and the chunks only they used; template snapshots stay."""
    from tartarus.cluster.collect import collect
    from tartarus.cluster.db import connect
    from tartarus.cluster.objects import ObjectStore
    from tartarus.roles.stored import s3_from_env

    try:
        s3 = s3_from_env()
        if s3 is None:
            raise errors.InvalidArgument("collecting needs the object store: set TARTARUS_S3_*")
        with connect(_database_url()) as conn:
            done = collect(conn, ObjectStore(s3), grace_s=grace)
    except errors.TartarusError as e:
        raise _fail(e) from e
    typer.echo(
        f"deleted {len(done.captures)} captures and {done.chunks} chunks; "
        f"kept {done.kept_captures} captures and {done.kept_chunks} chunks"
    )
