"""The leak check every test gets also sees gVisor sandboxes: it fails the test that left one."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

from tartarus.paths import REPO_ROOT
from tests.gvisor.helpers import require_gvisor


def test_a_leaked_gvisor_sandbox_fails_its_test_and_none_outlives_the_run() -> None:
    require_gvisor()
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
