"""Shared fixtures. VM tests boot real microVMs (TCG here, KVM where it works) from the built templates."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def qemu_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "qemu-system-x86_64"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


@pytest.fixture(scope="session")
def daemon_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="session")
def daemon_url(daemon_state: Path) -> Iterator[str]:
    """A real daemon (uvicorn + FastAPI + manager) serving on a unix socket from a thread."""
    from tartarus.daemon.server import daemon_thread

    uds = daemon_state / "api.sock"
    with daemon_thread(daemon_state, uds):
        yield f"unix://{uds}"
