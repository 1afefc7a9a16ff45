"""Cleaning up after sandboxes nobody owns any more: what a previous daemon left in its state directory."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Collection
from pathlib import Path

from tartarus.gvisor.leftovers import CONTAINER_DIR, reap_container
from tartarus.limits.cgroups import reap as reap_cgroup
from tartarus.network import sandbox as network_records
from tartarus.runtime.vm import PID_FILE, is_our_vmm

log = logging.getLogger(__name__)


def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    """A SIGKILLed VMM still holds its TAP and cgroup until the kernel has finished with it."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state == "Z":  # a zombie holds nothing; its parent (the dead daemon) is gone or will reap it
            return
        time.sleep(0.01)


def reap_leftovers(root: Path, keep: Collection[Path] = ()) -> list[str]:
    """Clean what a previous daemon left under `root` (bar the directories in `keep`, sandboxes to be
    taken over): kill VMMs still recorded there, delete dirs.

    Returns the ids cleaned. Only processes that are QEMU *and* reference this sandbox's directory are
    killed, so a recycled pid never hits an unrelated process.
    """
    cleaned: list[str] = []
    if not root.exists():
        return cleaned
    for workdir in sorted(root.iterdir()):
        if workdir.is_dir() and workdir not in keep:
            reap_workdir(workdir)
            cleaned.append(workdir.name)
    return cleaned


def reap_workdir(workdir: Path) -> None:
    """Everything one sandbox directory stands for: its VMM, network namespace, cgroups, files."""
    pid_file = workdir / PID_FILE
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text())
        if is_our_vmm(pid, workdir):
            os.kill(pid, 9)
            log.warning("killed leftover VMM pid %d of %s", pid, workdir.name)
            _wait_gone(pid)
    left = reap_container(workdir / CONTAINER_DIR)  # a gVisor sandbox's runsc processes
    if left:
        log.error("could not kill the gVisor processes %s of %s", left, workdir.name)
    network_records.reap(workdir)
    reap_cgroup(workdir.name)
    shutil.rmtree(workdir, ignore_errors=True)
