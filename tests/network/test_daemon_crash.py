"""A daemon killed with SIGKILL leaves namespaces, uplinks and cgroups; the next daemon removes them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tartarus.paths import LOCAL_KEY_FILE
from tartarus.sdk import Sandbox
from tests.network.conftest import leftovers, uplinks, wait_for

pytestmark = pytest.mark.vm


def _serve(state: Path, sock: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TARTARUS_STATE_DIR": str(state), "TARTARUS_POOL_SIZE": "1"}
    argv = [sys.executable, "-m", "tartarus.cli.main", "serve", "--socket", str(sock)]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: sock.exists() or process.poll() is not None, 60), "daemon did not start"
    assert process.poll() is None, "daemon exited"
    return process


def test_next_daemon_reaps_what_a_killed_one_left(tmp_path: Path) -> None:
    state, sock = tmp_path / "state", tmp_path / "api.sock"
    before = uplinks()
    daemon = _serve(state, sock)
    try:
        key = (state / LOCAL_KEY_FILE).read_text().strip()  # the socket is not beside the state dir
        sb = Sandbox.create("python-ds", url=f"unix://{sock}", api_key=key, network="full", timeout=600)
        assert "netns" in leftovers(sb.id)
        pooled = [p.name for p in (state / "sandboxes").iterdir() if p.name != sb.id]
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    # The VMMs died with their parent (PR_SET_PDEATHSIG); their namespaces, uplinks and cgroups did not.
    assert "netns" in leftovers(sb.id)
    assert uplinks() - before
    sock.unlink(missing_ok=True)
    daemon = _serve(state, sock)
    try:
        # Reaping happens before the socket is served, so by now the old sandbox is gone.
        assert leftovers(sb.id) == []
        for name in pooled:
            assert leftovers(name) == []
        new = {p.name for p in (state / "sandboxes").iterdir()}
        assert sb.id not in new
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    deadline = time.monotonic() + 10
    while uplinks() - before and time.monotonic() < deadline:
        time.sleep(0.05)  # the last daemon's own pool is torn down on SIGTERM
    assert uplinks() - before == set()
