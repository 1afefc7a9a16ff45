"""The README's first example, run as a newcomer would: a fresh Python process, no daemon, no
TARTARUS_URL. `Sandbox.create` (and `AsyncSandbox.create`) start an embedded daemon, as `tartarus run`
does, and nothing of it outlives the process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import leaks
from tests.conftest import qemu_pids, wait_until

pytestmark = pytest.mark.vm

README_EXAMPLE = """
from tartarus import Sandbox

with Sandbox.create("python-ds") as sb:
    sb.files.write("/tmp/data.csv", b"a,b\\n1,2\\n3,4\\n")
    print(sb.run_code("df = pd.read_csv('/tmp/data.csv')\\ndf.describe()").result)
    print(sb.commands.run("python3 -c 'import sklearn; print(sklearn.__version__)'").stdout)
"""

# The async twin, leaving its sandbox to the daemon's stop at exit (no `async with`).
ASYNC_EXAMPLE = """
import asyncio
from tartarus import AsyncSandbox

async def main():
    sb = await AsyncSandbox.create("python-ds")
    print((await sb.commands.run("echo $((6*7))")).stdout.strip())
    print(len(await AsyncSandbox.list()))

asyncio.run(main())
"""


def _run(script: str, state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TARTARUS_STATE_DIR": str(state), "TARTARUS_POOL_SIZE": "0"}
    for var in ("TARTARUS_URL", "TARTARUS_API_KEY", "TARTARUS_DATABASE_URL"):
        env.pop(var, None)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240
    )


def _nothing_left(state: Path) -> bool:
    """No VMM, and nothing else of a sandbox (network namespace, cgroups, directory): the embedded daemon
    stopped cleanly as the interpreter exited, not just died with it."""
    dirs = [state / "embedded" / "slot-0" / "sandboxes"]
    return wait_until(lambda: not qemu_pids(state) and not leaks.traces(state, dirs), 10)


def test_readme_example_starts_a_daemon_when_none_runs(tmp_path: Path) -> None:
    state = tmp_path / "state"  # no daemon serves its socket
    out = _run(README_EXAMPLE, state)
    assert out.returncode == 0, out.stderr
    assert "count" in out.stdout and "mean" in out.stdout, out.stdout  # df.describe()
    assert out.stdout.strip().splitlines()[-1].count(".") >= 1, out.stdout  # sklearn.__version__
    assert (state / "embedded" / "slot-0").is_dir()  # the embedded daemon's, as for `tartarus run`
    assert _nothing_left(state), leaks.traces(state)


def test_async_sdk_starts_one_too_and_its_sandboxes_end_with_the_process(tmp_path: Path) -> None:
    state = tmp_path / "state"
    out = _run(ASYNC_EXAMPLE, state)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["42", "1"]  # `list` sees the embedded daemon's sandbox
    assert _nothing_left(state), leaks.traces(state)
