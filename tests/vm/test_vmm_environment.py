"""A VMM inherits nothing of the daemon's environment: the daemon's may hold the database's password or
the object store's keys, and a guest that escaped into QEMU could read them from /proc/self/environ."""

from __future__ import annotations

import secrets
import signal
from pathlib import Path

import pytest

from tartarus.runtime import ramfile
from tartarus.sdk import Sandbox
from tests.conftest import qemu_pids
from tests.served import Served


def test_the_vmm_gets_a_minimal_environment_not_the_daemons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = secrets.token_hex(16)
    monkeypatch.setenv("TARTARUS_TEST_SECRET", secret)  # stands for TARTARUS_DATABASE_URL, AWS_SECRET_…
    daemon = Served(tmp_path / "state")
    try:
        with Sandbox.create("python-ds", url=daemon.url, api_key=daemon.key) as sb:
            (pid,) = qemu_pids(tmp_path / "state" / "sandboxes" / sb.id)
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            names = {entry.split(b"=", 1)[0].decode() for entry in environ.split(b"\0") if entry}
            assert secret.encode() not in environ
            # and, with a QEMU before 8.2, the read-only RAM shim and the one path it opens read-only;
            # under TCG, one malloc arena
            assert names <= {"PATH", "LANG", "LD_PRELOAD", ramfile.PATH_ENV, "MALLOC_ARENA_MAX"}, names
            assert sb.commands.run("echo alive").stdout == "alive\n"
    finally:
        daemon.stop(signal.SIGTERM)
