"""The ready pool (snapshots/ready.py) through a real daemon: a create binds a sandbox that was restored,
made distinct and warmed before the call; each is still its own clone, gets the request's env, and a
ready sandbox whose VMM died is never handed out."""

from __future__ import annotations

import ast
import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartarus.daemon.config import DaemonConfig, ReadySizes
from tartarus.daemon.server import daemon_thread
from tartarus.sandbox.sandbox import Sandbox as HostSandbox
from tartarus.sandbox.spec import SandboxSpec
from tartarus.sdk import Sandbox
from tartarus.snapshots.build import ensure_snapshot
from tartarus.templates.built import Template
from tests.conftest import qemu_pids
from tests.ready import ready_metrics, wait_ready

SIZE = 2
PROBE = (
    "import os, time, socket\n"
    "(os.urandom(16).hex(), time.time(), socket.gethostname(), open('/etc/machine-id').read().strip())"
)


@pytest.fixture(scope="module")
def ready_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    state = tmp_path_factory.mktemp("ready-state")
    uds = state / "api.sock"
    config = DaemonConfig(pool_size=0, ready_pool=ReadySizes(per_template={"python-ds": SIZE}))
    with daemon_thread(state, uds, config):
        yield f"unix://{uds}", state


def test_ready_sandboxes_are_distinct_clones_with_the_right_time(ready_daemon: tuple[str, Path]) -> None:
    url, _ = ready_daemon
    before = wait_ready(url, SIZE)
    with Sandbox.create("python-ds", url=url) as a, Sandbox.create("python-ds", url=url) as b:
        assert "ready" in a.info.timings_ms and "ready" in b.info.timings_ms, "both came from the pool"
        ra = ast.literal_eval(a.run_code(PROBE).result or "")
        rb = ast.literal_eval(b.run_code(PROBE).result or "")
        assert ra[0] != rb[0], "kernel RNG must differ per clone"
        for r in (ra, rb):
            assert abs(r[1] - time.time()) < 2, "guest wall clock must be right"
        assert (ra[2], rb[2]) == (a.id, b.id)
        assert ra[3] != rb[3] and len(ra[3]) == 32
    after = ready_metrics(url)
    assert (after.hits - before.hits, after.misses - before.misses) == (SIZE, 0)


def test_env_given_at_create_reaches_run_code_and_commands(ready_daemon: tuple[str, Path]) -> None:
    url, _ = ready_daemon
    wait_ready(url, SIZE)
    env = {"GREETING": "hello from create", "QUOTED": 'it\'s "quoted"'}
    with Sandbox.create("python-ds", url=url, env=env) as sb:
        assert "ready" in sb.info.timings_ms
        assert sb.run_code("import os; (os.environ['GREETING'], os.environ['QUOTED'])").result == repr(
            (env["GREETING"], env["QUOTED"])
        )
        spawned = "import subprocess; subprocess.check_output(['sh', '-c', 'echo $GREETING']).decode()"
        assert sb.run_code(spawned).result == repr("hello from create\n")
        assert (
            sb.commands.run("echo $GREETING; echo $QUOTED").stdout == f"{env['GREETING']}\n{env['QUOTED']}\n"
        )


def test_a_ready_sandbox_whose_vmm_died_is_not_handed_out(ready_daemon: tuple[str, Path]) -> None:
    url, state = ready_daemon
    before = wait_ready(url, SIZE)
    waiting = qemu_pids(state / "sandboxes")
    assert len(waiting) == SIZE  # the module's other sandboxes are gone: these are the pool's
    for pid in waiting:
        os.kill(pid, signal.SIGKILL)
    with Sandbox.create("python-ds", url=url) as sb:  # at once: the daemon may not have seen them die
        assert "ready" not in sb.info.timings_ms and sb.info.restored
        assert sb.run_code("1+1").result == "2"
    after = ready_metrics(url)
    assert (after.hits - before.hits, after.misses - before.misses) == (0, 1)
    wait_ready(url, SIZE)  # the dead are destroyed and replaced
    assert not waiting & qemu_pids(state / "sandboxes")


def test_env_reaches_the_interpreter_of_a_restore_too(python_ds: Template, tmp_path: Path) -> None:
    """The same env for a create the pool cannot serve (restored in the call)."""
    snapshot = ensure_snapshot(python_ds)
    spec = SandboxSpec("python-ds", env={"GREETING": "restored"})

    async def main() -> str | None:
        sandbox = await HostSandbox.restore(snapshot, python_ds, tmp_path, spec)
        try:
            interpreter = await sandbox.code_interpreter()
            return (await interpreter.run_code("__import__('os').environ['GREETING']")).result
        finally:
            await sandbox.destroy()

    assert asyncio.run(main()) == "'restored'"
    assert not qemu_pids(tmp_path)
