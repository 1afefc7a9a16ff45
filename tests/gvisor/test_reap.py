"""What a daemon killed with -9 leaves of a gVisor container is found and removed by `reap`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tartarus.gvisor.container import pids_under, reap
from tartarus.paths import REPO_ROOT
from tests.gvisor.helpers import host_traces, require_gvisor


@pytest.fixture(scope="module", autouse=True)
def gvisor_works() -> None:
    require_gvisor()


def test_a_container_whose_owner_was_killed_runs_on_until_reaped(tmp_path: Path) -> None:
    workdir = tmp_path / "orphan"
    run = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("orphan_probe.py")), str(workdir)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == -9 and run.stdout == "created\n", run.stderr
    assert pids_under(workdir / "runsc"), "the created container should outlive its owner"
    asyncio.run(reap(workdir))
    assert host_traces(workdir) == []


def test_reaping_what_is_already_gone_is_harmless(tmp_path: Path) -> None:
    asyncio.run(reap(tmp_path / "never-existed"))
    assert not (tmp_path / "never-existed").exists()
