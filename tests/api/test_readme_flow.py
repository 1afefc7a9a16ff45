"""The README's service flow, through the real binaries: `tartarus serve`, `tartarus keys create`, then the
SDK from another process with TARTARUS_URL and TARTARUS_API_KEY; and the local CLI with no key at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.served import TARTARUS, Served

pytestmark = pytest.mark.vm

SDK_SCRIPT = """
from tartarus import Sandbox
with Sandbox.create("python-ds", labels={"team": "ml"}, timeout=600) as sb:
    print(sb.commands.run("python3 -c 'print(6*7)'").stdout.strip())
    print(sb.info.tenant, len(Sandbox.list(labels={"team": "ml"})))
"""


def test_serve_create_a_key_and_drive_sandboxes_from_another_shell(tmp_path: Path) -> None:
    state = tmp_path / "state"
    daemon = Served(state)
    try:
        env = {**os.environ, "TARTARUS_STATE_DIR": str(state)}
        made = subprocess.run(
            [str(TARTARUS), "keys", "create", "--tenant", "alice"], capture_output=True, text=True, env=env
        )
        assert made.returncode == 0, made.stderr
        key = made.stdout.splitlines()[-1]
        client_env = {**os.environ, "TARTARUS_URL": daemon.url, "TARTARUS_API_KEY": key}
        client_env.pop("TARTARUS_STATE_DIR", None)
        out = subprocess.run(
            [sys.executable, "-c", SDK_SCRIPT], capture_output=True, text=True, env=client_env, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["42", "alice", "1"]
    finally:
        daemon.stop(signal.SIGTERM)


def test_local_cli_on_the_socket_needs_no_key(tmp_path: Path) -> None:
    state = tmp_path / "s"
    env = {**os.environ, "TARTARUS_STATE_DIR": str(state), "TARTARUS_POOL_SIZE": "0"}
    for var in ("TARTARUS_URL", "TARTARUS_API_KEY", "TARTARUS_DATABASE_URL"):
        env.pop(var, None)
    serve = subprocess.Popen([str(TARTARUS), "serve"], env=env, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: (state / "tartarus.sock").exists() and (state / "admin.key").exists(), 60)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(TARTARUS), *args], capture_output=True, text=True, env=env, timeout=120
            )

        created = cli("sandbox", "create", "python-ds", "--label", "job=1")
        assert created.returncode == 0, created.stderr
        sandbox_id = created.stdout.strip()
        ran = cli("sandbox", "exec", sandbox_id, "--", "python3", "-c", "print(6*7)")
        assert (ran.returncode, ran.stdout) == (0, "42\n"), ran.stderr
        assert sandbox_id in cli("sandbox", "ls", "--label", "job=1", "--json").stdout
        assert cli("sandbox", "kill", sandbox_id).returncode == 0
        assert (state / "admin.key").stat().st_mode & 0o777 == 0o600
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
