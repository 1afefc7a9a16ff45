"""The `tartarus` command line."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Column, Table

from tartarus import errors
from tartarus.paths import default_socket, state_dir

if TYPE_CHECKING:
    from tartarus.sdk import CommandResult, Sandbox, SandboxInfo

app = typer.Typer(help="Tartarus: microVM sandboxes for untrusted code.", no_args_is_help=True)
sandbox_app = typer.Typer(help="Manage sandboxes.", no_args_is_help=True)
template_app = typer.Typer(help="Manage templates.", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")
checkpoint_app = typer.Typer(help="Manage checkpoints (sandbox snapshots).", no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")


@app.callback()
def _main() -> None:
    """Turn SIGTERM into SystemExit so cleanup (VMs, writable layers, temp dirs) runs as on Ctrl-C."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


app.add_typer(template_app, name="template")

err = Console(stderr=True)


def _fail(exc: errors.TartarusError) -> typer.Exit:
    err.print(f"[red]error[/red] ({exc.code}): {exc.message}")
    return typer.Exit(2)


def _parse_env(pairs: list[str] | None, option: str = "--env") -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=option)
        env[key] = value
    return env


@contextlib.contextmanager
def _endpoint() -> Iterator[str | None]:
    """The daemon to talk to: TARTARUS_URL, the local daemon, or an embedded one for this command."""
    if os.environ.get("TARTARUS_URL"):
        yield None
        return
    from tartarus.sdk._autostart import daemon_answers

    sock = default_socket()
    if daemon_answers(sock):
        yield f"unix://{sock}"
        return
    from tartarus.daemon.server import embedded_daemon

    with embedded_daemon(state_dir()) as uds:
        yield f"unix://{uds}"


def _stream(sb: Sandbox, command: list[str], **options: Any) -> CommandResult:
    """Run a command, copying its output to ours as it arrives."""
    return sb.commands.run(command, on_stdout=_to_stdout, on_stderr=_to_stderr, **options)


def _to_stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _to_stderr(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


def _exit_status(result: CommandResult) -> int:
    if result.timed_out:
        return 124
    if result.signal:
        return 128 + result.signal
    return result.exit_code or 0


@app.command()
def audit(
    last: Annotated[int, typer.Option("--last", "-n", min=1, help="the newest N records")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON record per line")] = False,
) -> None:
    """Show the audit log of the local daemon's state directory (quarantine, release, expiry...)."""
    from tartarus import audit as audit_log

    records = audit_log.read(state_dir())[-last:]
    if as_json:
        for record in records:
            print(json.dumps(record))
        return
    import datetime

    table = Table("TIME (UTC)", "ACTION", "SANDBOX", "BY", "DETAIL")
    for r in records:
        when = datetime.datetime.fromtimestamp(r["ts"], datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        rest = {k: v for k, v in r.items() if k not in ("ts", "action", "sandbox", "by")}
        detail = ", ".join(f"{k}={v}" for k, v in rest.items())
        table.add_row(when, r["action"], r.get("sandbox", ""), r.get("by", ""), detail)
    Console().print(table)


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: Annotated[list[str], typer.Argument(help="command and arguments, after --")],
    template: Annotated[str, typer.Option("--template", "-t")] = "python-ds",
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE")] = None,
    cwd: Annotated[str | None, typer.Option(help="working directory in the guest")] = None,
    timeout: Annotated[float | None, typer.Option(help="seconds before the command is killed")] = None,
    backend: Annotated[
        str | None,
        typer.Option(help="kvm, tcg or gvisor (default: the template's, the daemon's, the host's VM)"),
    ] = None,
) -> None:
    """Create a sandbox, run COMMAND in it streaming its output, destroy it; exit with its status."""
    from tartarus.sdk import Sandbox

    env_vars = _parse_env(env)
    try:
        with _endpoint() as url:
            with err.status(f"starting a {template} sandbox" + (f" on {backend}" if backend else "")):
                sb = Sandbox.create(template, url=url, backend=backend)
            with sb:
                result = _stream(sb, command, env=env_vars, cwd=cwd, timeout=timeout)
    except errors.TartarusError as e:
        raise _fail(e) from e
    raise typer.Exit(_exit_status(result))


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="listen on TCP (e.g. 127.0.0.1)")] = None,
    port: Annotated[int, typer.Option(help="TCP port, with --host")] = 8700,
    socket: Annotated[Path | None, typer.Option(help="unix socket path (default: the state dir's)")] = None,
    log_format: Annotated[str, typer.Option(help="json (one object per line) or text")] = "json",
    keep_sandboxes: Annotated[
        bool,
        typer.Option(help="on SIGTERM leave running sandboxes running, for the next daemon to take over"),
    ] = False,
    e2b_port: Annotated[
        int | None, typer.Option(help="also serve E2B's API on this TCP port (docs/e2b.md); off by default")
    ] = None,
    e2b_host: Annotated[str, typer.Option(help="the address for --e2b-port")] = "127.0.0.1",
) -> None:
    """Run the daemon: owns the sandboxes and serves the REST API.

    Its sandboxes outlive a crash (the next daemon takes them over); a clean stop destroys them, unless
    --keep-sandboxes (an upgrade or restart without disturbing them)."""
    from tartarus.daemon import logs
    from tartarus.daemon.server import serve as run_server

    if log_format not in ("json", "text"):
        raise typer.BadParameter("must be json or text", param_hint="--log-format")
    logs.configure(log_format)
    uds = None if host else socket or default_socket()
    try:
        with contextlib.ExitStack() as stack:
            if e2b_port is not None:
                from tartarus.e2b.server import Daemon, e2b_endpoint

                daemon = Daemon(state_dir(), host=host, port=port, uds=uds)
                stack.enter_context(e2b_endpoint(daemon, e2b_host, e2b_port))
            if uds is None:
                run_server(state_dir(), host=host, port=port, keep_sandboxes=keep_sandboxes)
            else:
                run_server(state_dir(), uds=uds, keep_sandboxes=keep_sandboxes)
    except errors.TartarusError as e:
        raise _fail(e) from e


@app.command()
def openapi(output: Annotated[Path | None, typer.Option("--output", "-o")] = None) -> None:
    """Print (or write) the REST API's OpenAPI document; docs/openapi.json is this, committed."""
    from tartarus.daemon.app import create_app, dumps_openapi

    text = dumps_openapi(create_app(state_dir()))
    if output:
        output.write_text(text)
    else:
        sys.stdout.write(text)


@app.command()
def setup(
    template: Annotated[list[str] | None, typer.Option(help="templates to build")] = None,
) -> None:
    """Build the guest kernel, agent and templates (cached: a second run takes seconds)."""
    from tartarus.provision import provision

    logging.basicConfig(level=logging.WARNING)
    try:
        provision(template if template is not None else ["python-ds", "base"], log=err.print)
    except errors.TartarusError as e:
        raise _fail(e) from e


# ---- sandbox ---------------------------------------------------------------------------------


@sandbox_app.command("create")
def sandbox_create(
    template: Annotated[str, typer.Argument()] = "python-ds",
    env: Annotated[list[str] | None, typer.Option("--env", "-e")] = None,
    network: Annotated[str, typer.Option(help="none, full, or allow")] = "none",
    allow: Annotated[
        list[str] | None, typer.Option("--allow", help="HOST[:PORT,...] (a CIDR or DNS name); implies allow")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="seconds until it is destroyed")] = None,
    disk_mib: Annotated[
        int | None, typer.Option("--disk-mib", help="writable disk size in MiB (default: the template's)")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE, for list filters and policy rules")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(help="kvm, tcg or gvisor (default: the template's, the daemon's, the host's VM)"),
    ] = None,
) -> None:
    """Create a sandbox on the running daemon and print its id."""
    from tartarus.sdk import SandboxInfo
    from tartarus.sdk._core import create_request
    from tartarus.sdk.sync import Client

    rules = [_allow_rule(a) for a in allow or []]
    policy: dict[str, object] = {"mode": "allow" if rules else network}
    if rules:
        policy["allow"] = rules
    path, body = create_request(
        template,
        from_snapshot=None,
        vcpus=None,
        memory_mib=None,
        env=_parse_env(env),
        idle_timeout=None,
        network=policy,
        timeout=timeout,
        labels=_parse_env(label, "--label"),
        disk_mib=disk_mib,
        backend=backend,
    )
    try:
        client = Client()
        print(SandboxInfo.from_json(client.request("POST", path, json=body).json()).id)
    except errors.TartarusError as e:
        raise _fail(e) from e


@sandbox_app.command("exec", context_settings={"allow_interspersed_args": False})
def sandbox_exec(
    sandbox_id: str,
    command: Annotated[list[str], typer.Argument()],
    timeout: Annotated[float | None, typer.Option()] = None,
) -> None:
    """Run a command in an existing sandbox, streaming its output; exit with its status."""
    from tartarus.sdk import Sandbox

    if command[:1] == ["--"]:  # click stops parsing options after the id and keeps the separator
        command = command[1:]

    try:
        result = _stream(Sandbox.connect(sandbox_id), command, timeout=timeout)
    except errors.TartarusError as e:
        raise _fail(e) from e
    raise typer.Exit(_exit_status(result))


@sandbox_app.command("shell", context_settings={"allow_interspersed_args": False})
def sandbox_shell(
    sandbox_id: str,
    command: Annotated[list[str] | None, typer.Argument(help="default: bash, else sh")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE")] = None,
    cwd: Annotated[str | None, typer.Option(help="working directory in the guest")] = None,
    user: Annotated[str | None, typer.Option(help="run as this guest user")] = None,
) -> None:
    """Open an interactive terminal in a sandbox (^C, job control and resizing work); exit with the
    command's status. `tartarus sandbox shell ID -- python3` runs another program on it."""
    from tartarus.cli.shell import interact, local_size
    from tartarus.sdk import Sandbox

    command = command or []
    if command[:1] == ["--"]:  # click stops parsing options after the id and keeps the separator
        command = command[1:]
    rows, cols = local_size(sys.stdout.fileno())
    try:
        sb = Sandbox.connect(sandbox_id)
        pty = sb.pty.create(
            rows=rows, cols=cols, cmd=command or None, env=_parse_env(env), cwd=cwd, user=user
        )
        status = interact(pty)
    except errors.TartarusError as e:
        raise _fail(e) from e
    raise typer.Exit(status)


@sandbox_app.command("ls")
def sandbox_ls(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    label: Annotated[
        list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE, all must match")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", "-a", help="also destroyed, failed and lost ones")] = False,
) -> None:
    """List sandboxes (yours; an admin key's: everyone's)."""
    from tartarus.sdk import Sandbox

    try:
        sandboxes = Sandbox.list(labels=_parse_env(label, "--label"), include_ended=all_)
    except errors.TartarusError as e:
        raise _fail(e) from e
    if as_json:
        print(json.dumps([dataclasses.asdict(s) for s in sandboxes], indent=2))
        return
    # The id is what a reader copies and acts on: never cut, however narrow the terminal.
    table = Table(
        Column("ID", no_wrap=True, min_width=15), "TENANT", "TEMPLATE", "STATE", "BACKEND", "VCPUS", "MEMORY",
        "LABELS",
    )  # fmt: skip
    for s in sandboxes:
        labels = ",".join(f"{k}={v}" for k, v in s.labels.items())
        table.add_row(
            s.id, s.tenant or "-", s.template, s.state, s.backend or "-", str(s.vcpus), f"{s.memory_mib} MiB",
            labels,
        )  # fmt: skip
    # Piped into a script, a table keeps its natural width (rich would otherwise fit it to 80 columns).
    Console(width=None if sys.stdout.isatty() else 1000).print(table)


def _allow_rule(text: str) -> dict[str, object]:
    host, _, ports = text.rpartition(":") if ":" in text else (text, "", "")
    try:
        return {"host": host, "ports": [int(p) for p in ports.split(",") if p]}
    except ValueError:
        raise typer.BadParameter(f"--allow {text!r}: want HOST or HOST:PORT[,PORT...]") from None


@sandbox_app.command("quarantine")
def sandbox_quarantine(
    sandbox_id: str, reason: Annotated[str, typer.Option("--reason", "-r")] = "operator"
) -> None:
    """Operator: cut a sandbox's network and clamp its CPU and memory, live (audited)."""
    from tartarus.sdk.sync import Client

    try:
        Client().request("POST", f"/v1/sandboxes/{sandbox_id}/quarantine", json={"reason": reason})
    except errors.TartarusError as e:
        raise _fail(e) from e


@sandbox_app.command("release")
def sandbox_release(sandbox_id: str) -> None:
    """Operator: end a sandbox's quarantine (audited)."""
    from tartarus.sdk.sync import Client

    try:
        Client().request("POST", f"/v1/sandboxes/{sandbox_id}/release")
    except errors.TartarusError as e:
        raise _fail(e) from e


def _call_each(
    method: str, path: str, ids: list[str], say: Callable[[str, SandboxInfo], str] | None = None
) -> None:
    """One API call per id (`{id}` in `path`), printing `say(id, sandbox)` for a call that answers with
    the sandbox; stops at the first error."""
    from tartarus.sdk import SandboxInfo
    from tartarus.sdk.sync import Client

    try:
        client = Client()
        for id_ in ids:
            response = client.request(method, path.format(id=id_))
            if say is not None:
                print(say(id_, SandboxInfo.from_json(response.json())))
    except errors.TartarusError as e:
        raise _fail(e) from e


@sandbox_app.command("kill")
def sandbox_kill(sandbox_ids: Annotated[list[str], typer.Argument()]) -> None:
    """Destroy sandboxes (their writable layers are deleted)."""
    _call_each("DELETE", "/v1/sandboxes/{id}", sandbox_ids)


@sandbox_app.command("hibernate")
def sandbox_hibernate(sandbox_ids: Annotated[list[str], typer.Argument()]) -> None:
    """Put sandboxes to disk: no process, no RAM. Any later call (or `wake`) brings them back as they were."""
    _call_each(
        "POST",
        "/v1/sandboxes/{id}/hibernate",
        sandbox_ids,
        lambda id_, info: f"{id_} hibernated ({(info.disk_bytes or 0) / 2**20:.1f} MiB on disk)",
    )


@sandbox_app.command("wake")
def sandbox_wake(sandbox_ids: Annotated[list[str], typer.Argument()]) -> None:
    """Wake hibernated sandboxes."""
    _call_each("POST", "/v1/sandboxes/{id}/wake", sandbox_ids, lambda id_, info: f"{id_} {info.state}")


@sandbox_app.command("snapshot")
def sandbox_snapshot(
    sandbox_id: str,
    ttl: Annotated[float | None, typer.Option(help="seconds after its last use until gc deletes it")] = None,
) -> None:
    """Checkpoint a running sandbox (it runs on) and print the checkpoint's id."""
    from tartarus.sdk import Sandbox

    try:
        print(Sandbox.connect(sandbox_id).snapshot(ttl=ttl).id)
    except errors.TartarusError as e:
        raise _fail(e) from e


@sandbox_app.command("fork")
def sandbox_fork(
    sandbox_id: str, count: Annotated[int, typer.Option("--count", "-n", min=1, max=16)] = 1
) -> None:
    """Make running copies of a sandbox and print their ids."""
    from tartarus.sdk import Sandbox

    try:
        for copy in Sandbox.connect(sandbox_id).fork(count):
            print(copy.id)
    except errors.TartarusError as e:
        raise _fail(e) from e


# ---- checkpoints -----------------------------------------------------------------------------


@checkpoint_app.command("ls")
def checkpoint_ls(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List checkpoints."""
    from tartarus.sdk import CheckpointInfo
    from tartarus.sdk.sync import Client

    try:
        checkpoints = CheckpointInfo.list_from_json(Client().request("GET", "/v1/checkpoints").json())
    except errors.TartarusError as e:
        raise _fail(e) from e
    if as_json:
        print(json.dumps([dataclasses.asdict(c) for c in checkpoints], indent=2))
        return
    table = Table("ID", "FROM SANDBOX", "TEMPLATE", "DISK", "TTL")
    for c in checkpoints:
        ttl = "-" if c.ttl_s is None else f"{c.ttl_s:g} s"
        table.add_row(c.id, c.sandbox_id, c.template, f"{c.disk_bytes / 2**20:.1f} MiB", ttl)
    Console().print(table)


@checkpoint_app.command("rm")
def checkpoint_rm(checkpoint_ids: Annotated[list[str], typer.Argument()]) -> None:
    """Delete checkpoints (sandboxes started from them are not affected)."""
    _call_each("DELETE", "/v1/checkpoints/{id}", checkpoint_ids)


@app.command("gc")
def gc() -> None:
    """Delete expired checkpoints and the snapshot pins nothing needs any more, and remove network
    namespaces whose sandbox directory is gone (a crashed daemon's, a deleted state dir's)."""
    from tartarus.sdk.sync import Client

    try:
        removed = Client().request("POST", "/v1/gc").json()
    except errors.TartarusError as e:
        raise _fail(e) from e
    print(
        f"removed {len(removed['checkpoints'])} checkpoints, {len(removed['pins'])} pins, "
        f"{len(removed.get('namespaces', []))} orphaned network namespaces"
    )


# ---- templates -------------------------------------------------------------------------------


@template_app.command("build")
def template_build(name: str) -> None:
    """Build (or find cached) a template from templates/NAME.yaml or a spec file, and its snapshot."""
    from tartarus.snapshots.build import ensure_snapshot
    from tartarus.templates.build import build_template
    from tartarus.templates.spec import TemplateSpec, builtin_spec

    try:
        spec = TemplateSpec.load(Path(name)) if name.endswith((".yaml", ".yml")) else builtin_spec(name)
        with err.status(f"building template {spec.name}"):
            template = build_template(spec, err.print)
            if template.snapshotted:
                ensure_snapshot(template, err.print)
    except errors.TartarusError as e:
        raise _fail(e) from e
    print(f"{template.name} {template.key}")


@template_app.command("ls")
def template_ls() -> None:
    """List built templates and whether each has a snapshot to restore sandboxes from."""
    from tartarus.snapshots.snapshot import find_snapshot
    from tartarus.templates.built import list_templates

    table = Table("NAME", "KEY", "FS", "SIZE", "SNAPSHOT")
    for t in list_templates():
        snapshot = find_snapshot(t) if t.snapshotted else None
        size = f"{t.rootfs.stat().st_blocks * 512 / 2**20:.0f} MiB"
        table.add_row(t.name, t.key, t.fstype, size, snapshot.key if snapshot else "-")
    Console().print(table)


@template_app.command("rm")
def template_rm(name: str) -> None:
    """Forget a built template; its filesystem and snapshots stay cached by content for a rebuild."""
    from tartarus.templates.built import remove_template

    try:
        remove_template(name)
    except errors.TartarusError as e:
        raise _fail(e) from e


def _register_bench() -> None:
    from tartarus.bench.cli import bench_app

    app.add_typer(bench_app, name="bench")


def _register_keys() -> None:
    from tartarus.cli.keys import keys_app, tenants_app

    app.add_typer(keys_app, name="keys")
    app.add_typer(tenants_app, name="tenants")


def _register_image() -> None:
    from tartarus.images.cli import image_app

    app.add_typer(image_app, name="image")


def _register_cluster() -> None:
    from tartarus.cli.cluster import agent, gateway, nodes_app

    app.command()(agent)
    app.command()(gateway)
    app.add_typer(nodes_app, name="nodes")


_register_bench()
_register_image()
_register_keys()
_register_cluster()

if __name__ == "__main__":
    app()
