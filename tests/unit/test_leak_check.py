"""The leak check fails the test that leaked, reaps what it left, and spares the others."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

from tartarus.limits.cgroups import GROUP, ROOT
from tartarus.paths import REPO_ROOT


def test_a_leaked_namespace_and_cgroup_fail_their_test_and_are_reaped() -> None:
    leaked = "sb-" + secrets.token_hex(6)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "tests/unit/leaky_probe.py"],
        cwd=REPO_ROOT,
        env={**os.environ, "TARTARUS_LEAK_PROBE_ID": leaked, "TARTARUS_TEST_LEAK_SETTLE_S": "0.5"},
        capture_output=True,
        text=True,
    )
    out = run.stdout
    assert "2 passed, 1 error" in out, out  # the leaky test passed its call, then failed teardown
    assert "ERROR tests/unit/leaky_probe.py::test_leaves_a_namespace_and_a_cgroup" in out, out
    assert f"netns tartarus-{leaked}" in out and f"pids/{GROUP}/{leaked}" in out, out
    assert not Path(f"/run/netns/tartarus-{leaked}").exists()
    assert not (ROOT / "pids" / GROUP / leaked).exists()
