"""Reaping a gVisor sandbox nobody owns any more, synchronously: what a daemon killed with -9 left in
its state directory. Its started containers ended when their agent channel closed with the daemon,
but one that was only created runs on, and its runsc state and writable layer stay on disk."""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from pathlib import Path

from tartarus.gvisor.container import Layout, pids_under

log = logging.getLogger(__name__)

# Where a sandbox's container lives in the sandbox's own directory (`<state>/sandboxes/<id>/gvisor/`).
CONTAINER_DIR = "gvisor"


def _kill_and_wait(pid: int, deadline: float) -> None:
    """SIGKILL through a pidfd (no pid-reuse race) and wait until the process has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


def reap_container(workdir: Path, timeout: float = 5.0) -> list[int]:
    """Kill every host process of the container in `workdir` (runsc's sandbox, gofer and stubs: they
    carry its state root); the pids still there after `timeout`. The caller removes the directory."""
    if not workdir.exists():
        return []
    state = Layout(workdir).state
    deadline = time.monotonic() + timeout
    killed = False
    while pids := pids_under(state):
        if time.monotonic() >= deadline:
            return pids
        for pid in pids:
            _kill_and_wait(pid, deadline)
        killed = True
    if killed:
        log.warning("killed the leftover gVisor container of %s", workdir.parent.name)
    return []
