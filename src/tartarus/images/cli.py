"""`tartarus image ls | pull | rm | prune`."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from tartarus import errors

image_app = typer.Typer(
    help="Convert OCI/Docker images into root filesystems Tartarus boots.", no_args_is_help=True
)
err = Console(stderr=True)


def _fail(exc: errors.TartarusError) -> typer.Exit:
    err.print(f"[red]error[/red] ({exc.code}): {exc.message}")
    return typer.Exit(2)


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


@image_app.command("pull")
def pull_cmd(
    ref: Annotated[
        str, typer.Argument(help="REF, docker://REF, oci:DIR[:TAG] or docker-archive:FILE[:NAME:TAG]")
    ],
    insecure: Annotated[bool, typer.Option(help="plain HTTP to a non-loopback registry")] = False,
    platform: Annotated[
        str, typer.Option(help="os/arch or os/arch/variant to pick from an index")
    ] = "linux/amd64",
    fstype: Annotated[str, typer.Option(help="ext4 or erofs")] = "ext4",
    as_json: Annotated[bool, typer.Option("--json", help="print the build record as JSON")] = False,
) -> None:
    """Convert an image (or find it converted) and print where its root filesystem is."""
    from tartarus.images.api import pull

    t0 = time.perf_counter()
    tasks: dict[str, TaskID] = {}
    with Progress(
        TextColumn("{task.description:>9}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:

        def progress(phase: str, done: int, total: int) -> None:
            if phase in ("download", "apply"):
                if phase not in tasks:
                    tasks[phase] = bar.add_task(
                        "download" if phase == "download" else "unpack", total=total or None
                    )
                bar.update(tasks[phase], completed=done)
            elif phase == "build":
                tasks["build"] = bar.add_task("pack", total=None)

        try:
            build = pull(ref, insecure=insecure, progress=progress, platform=platform, fstype=fstype)
        except errors.TartarusError as e:
            raise _fail(e) from e
    elapsed = time.perf_counter() - t0
    for warning in build.warnings:
        err.print(f"[yellow]warning[/yellow]: {warning}")
    if as_json:
        print(build.to_json(), end="")
        return
    err.print(f"{ref}: {build.manifest_digest[:19]} {build.fstype} {_size(build.size)} in {elapsed:.2f} s")
    print(build.rootfs)


@image_app.command("ls")
def ls_cmd(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List converted images."""
    from tartarus.images.cache import ImageCache

    builds = ImageCache().all()
    if as_json:
        print(json.dumps([json.loads(b.to_json()) | {"rootfs": str(b.rootfs)} for b in builds], indent=2))
        return
    table = Table("REFS", "DIGEST", "PLATFORM", "FS", "SIZE", "CREATED")
    for b in builds:
        created = datetime.fromtimestamp(b.created).strftime("%Y-%m-%d %H:%M")
        table.add_row("\n".join(b.refs), b.manifest_digest[:19], b.platform, b.fstype, _size(b.size), created)
    Console().print(table)


@image_app.command("rm")
def rm_cmd(specs: Annotated[list[str], typer.Argument(help="refs or manifest digest prefixes")]) -> None:
    """Delete converted images (their blobs go at the next `prune`)."""
    from tartarus.images.cache import ImageCache

    store = ImageCache()
    try:
        for spec in specs:
            for build in store.remove(spec):
                print(f"removed {build.manifest_digest} ({', '.join(build.refs)})")
    except errors.TartarusError as e:
        raise _fail(e) from e


@image_app.command("prune")
def prune_cmd() -> None:
    """Delete cached blobs no converted image uses, and leftovers of interrupted pulls."""
    from tartarus.images.cache import ImageCache

    report = ImageCache().prune()
    print(f"removed {report.blobs} blobs ({_size(report.bytes)}) and {report.tmp_entries} leftovers")
