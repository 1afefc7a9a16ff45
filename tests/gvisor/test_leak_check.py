"""The leak check every test gets also sees gVisor sandboxes: it fails the test that left one."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from tartarus.gvisor.runsc import probe
from tartarus.paths import REPO_ROOT


def test_a_leaked_gvisor_sandbox_fails_its_test_and_none_outlives_the_run() -> None:
    support = probe()
    if not support.works:
        pytest.skip(f"gVisor cannot run a container on this host: {support.reason}")
    leaked = "sb-" + secrets.token_hex(6)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "tests/gvisor/leaky_probe.py"],
        cwd=REPO_ROOT,
        env={**os.environ, "TARTARUS_LEAK_PROBE_ID": leaked, "TARTARUS_TEST_LEAK_SETTLE_S": "0.5"},
        capture_output=True,
        text=True,
    )
    out = run.stdout
    assert "2 passed, 1 error" in out, out
    assert "ERROR tests/gvisor/leaky_probe.py::test_leaves_a_gvisor_sandbox_running" in out, out
    assert "runsc " in out, out
    left = subprocess.run(["pgrep", "-f", leaked], capture_output=True, text=True).stdout
    assert left == "", f"processes of {leaked} still run: {left}"
