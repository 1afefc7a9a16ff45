"""Not collected by default (no test_ prefix): tests/gvisor/test_leak_check.py runs it to see the
leak check fail a test that leaves a gVisor sandbox running."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from tartarus.gvisor.container import start_container
from tartarus.templates.built import get_template

LEAKED_ID = os.environ.get("TARTARUS_LEAK_PROBE_ID", "sb-000000000000")


def test_leaves_a_gvisor_sandbox_running(tmp_path: Path) -> None:
    asyncio.run(start_container(get_template("python-ds"), LEAKED_ID, tmp_path / LEAKED_ID))


def test_leaves_nothing() -> None:
    pass
