"""Not collected by default (no test_ prefix): tests/unit/test_leak_check.py runs it to see the leak
check fail a test that leaves a sandbox's namespace and cgroup behind."""

from __future__ import annotations

import os
import subprocess

from tartarus.limits.cgroups import GROUP, ROOT

LEAKED_ID = os.environ.get("TARTARUS_LEAK_PROBE_ID", "sb-000000000000")


def test_leaves_a_namespace_and_a_cgroup() -> None:
    subprocess.run(["ip", "netns", "add", f"tartarus-{LEAKED_ID}"], check=True)
    (ROOT / "pids" / GROUP / LEAKED_ID).mkdir(parents=True)


def test_leaves_nothing() -> None:
    pass
