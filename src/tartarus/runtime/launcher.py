"""The VMM launcher (`launcher.c`): joins namespace and cgroups, ties or detaches, jails, then execs QEMU.

A static helper instead of a Python `preexec_fn`, so starting a VMM is a vfork of the daemon rather
than a full fork under the interpreter lock (which stalled every request in flight for ~10 ms).
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tartarus.bootfiles.cache import cached, digest
from tartarus.bootfiles.initramfs import gcc_version
from tartarus.errors import SetupRequired
from tartarus.paths import cache_dir

SOURCE = Path(__file__).with_name("launcher.c")
NAME = "tartarus-launch"


@functools.cache
def launcher_key() -> str:
    return digest([gcc_version(), SOURCE.read_bytes()])


def build_launcher() -> Path:
    def build(out: Path) -> None:
        flags = ["-std=gnu11", "-Os", "-Wall", "-Wextra", "-Werror", "-D_FORTIFY_SOURCE=2", "-static", "-s"]
        subprocess.run(["gcc", *flags, "-o", str(out / NAME), str(SOURCE)], check=True)

    return cached("launcher", launcher_key(), build) / NAME


@functools.cache
def launcher_path() -> Path:
    path = cache_dir() / "launcher" / launcher_key() / NAME
    if not path.exists():
        raise SetupRequired("the VMM launcher is not built: run ./scripts/setup")
    return path


@dataclass(frozen=True)
class Identity:
    """Who the VMM becomes: its uid and gid, and the only supplementary groups it keeps."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class JailSpec:
    """The jail's mount point and what it holds (`tartarus.runtime.jail.View`)."""

    root: Path
    read_only: tuple[Path, ...] = ()
    writable: tuple[Path, ...] = ()
    links: tuple[Path, ...] = ()


def launch_argv(
    argv: list[str],
    *,
    tie_to: int | None,
    nice: int = 0,
    huge_pages: bool = True,
    netns_fd: int | None = None,
    cgroup_procs: tuple[str, ...] = (),
    tap: tuple[str, int] | None = None,
    pid_report_fd: int | None = None,
    jail: JailSpec | None = None,
    identity: Identity | None = None,
) -> list[str]:
    """The command line that runs `argv` confined: tied to the process `tie_to` (it dies with it) or,
    with None, in a session of its own (it outlives its starter, and a ^C to it); with `tap` (name,
    fd) the TAP opened at that fd; with `pid_report_fd`, as pid 1 of a PID namespace of its own, the
    starter's child (the launcher writes its pid to that fd and exits); in `jail`, as `identity`;
    without `huge_pages`, with transparent huge pages off."""
    line = [str(launcher_path())]
    line += ["--tie", str(tie_to)] if tie_to is not None else ["--setsid"]
    if nice:
        line += ["--nice", str(nice)]
    if not huge_pages:
        line.append("--no-thp")
    if netns_fd is not None:
        line += ["--netns", str(netns_fd)]
    for procs in cgroup_procs:
        line += ["--cgroup", procs]
    if tap is not None:
        line += ["--tap", tap[0], str(tap[1])]
    if pid_report_fd is not None:
        line += ["--pidns", str(pid_report_fd)]
    if jail is not None:
        line += ["--jail", str(jail.root)]
        for flag, paths in (("--ro", jail.read_only), ("--rw", jail.writable), ("--link", jail.links)):
            for path in paths:
                line += [flag, str(path)]
    if identity is not None:
        line += ["--uid", str(identity.uid), "--gid", str(identity.gid)]
        for gid in identity.groups:
            line += ["--group", str(gid)]
    return [*line, "--", *argv]
