"""The `vm` marker selects what it says: `-m "not vm"` must leave no test that boots a VM."""

from __future__ import annotations

import subprocess
import sys

from tartarus.paths import REPO_ROOT


def collected(*args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    ).stdout
    return [line for line in out.splitlines() if "::" in line]


def test_not_vm_deselects_every_vm_test() -> None:
    # tests/vm (marked by the conftest hook, not by a module marker) and a module elsewhere that uses a
    # VM fixture without marking itself.
    assert collected("tests/vm", "-m", "vm")
    assert collected("tests/vm", "-m", "not vm") == []
    remaining = collected("tests/api/test_dashboards.py", "tests/limits", "-m", "not vm")
    assert remaining and all("real_work" not in t and "limits" not in t for t in remaining), remaining
