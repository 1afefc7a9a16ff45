"""The gVisor ready pool (snapshots/gvisor_pool.py `GvisorReadyPool`) through a real daemon whose default
backend is gvisor: a create binds a sandbox restored and warmed before the call; each is its own clone,
gets the request's env in run_code and commands, and one whose container died is never handed out."""

from __future__ import annotations

import ast
import os
import select
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartarus.daemon.config import DaemonConfig, ReadySizes
from tartarus.daemon.server import daemon_thread
from tartarus.sdk import Sandbox
from tests.gvisor.helpers import require_gvisor
from tests.ready import ready_metrics, wait_ready

pytestmark = pytest.mark.vm

SIZE = 2
PROBE = (
    "import os, time\n"
    "(os.urandom(16).hex(), time.time(), open('/etc/machine-id').read().strip(),\n"
    " __import__('random').random())"
)


@pytest.fixture(scope="module")
def ready_gvisor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    require_gvisor()
    state = tmp_path_factory.mktemp("gvisor-ready-state")
    uds = state / "api.sock"
    config = DaemonConfig(
        pool_size=0, backend="gvisor", ready_pool=ReadySizes(per_template={"python-ds": SIZE})
    )
    with daemon_thread(state, uds, config):
        yield f"unix://{uds}", state


def sandbox_pids(state: Path) -> dict[str, int]:
    """The runsc sandbox process of each gVisor sandbox the daemon holds, by sandbox id."""
    found = {}
    for pid_file in (state / "sandboxes").glob("*/gvisor/sandbox.pid"):
        found[pid_file.parent.parent.name] = int(pid_file.read_text())
    return found


def test_pooled_gvisor_sandboxes_are_distinct_clones(ready_gvisor: tuple[str, Path]) -> None:
    url, _ = ready_gvisor
    before = wait_ready(url, SIZE)
    with Sandbox.create("python-ds", url=url) as a, Sandbox.create("python-ds", url=url) as b:
        assert a.info.backend == b.info.backend == "gvisor"
        assert "ready" in a.info.timings_ms and "ready" in b.info.timings_ms, "both came from the pool"
        ra = ast.literal_eval(a.run_code(PROBE).result or "")
        rb = ast.literal_eval(b.run_code(PROBE).result or "")
        assert ra[0] != rb[0], "entropy must differ per sandbox"
        for r in (ra, rb):
            assert abs(r[1] - time.time()) < 2, "the sandbox's clock must be the host's"
        assert ra[2] != rb[2] and len(ra[2]) == 32, "each gets its own machine-id"
        assert ra[3] != rb[3], "the interpreter's PRNG is reseeded per clone"
        assert a.commands.run("echo $((1+1))").stdout == "2\n"
    after = ready_metrics(url)
    assert (after.hits - before.hits, after.misses - before.misses) == (SIZE, 0)


def test_env_given_at_create_reaches_run_code_and_commands(ready_gvisor: tuple[str, Path]) -> None:
    url, _ = ready_gvisor
    wait_ready(url, SIZE)
    env = {"GREETING": "hello from create", "QUOTED": 'it\'s "quoted"'}
    with Sandbox.create("python-ds", url=url, env=env) as sb:
        assert "ready" in sb.info.timings_ms and sb.info.backend == "gvisor"
        assert sb.run_code("import os; (os.environ['GREETING'], os.environ['QUOTED'])").result == repr(
            (env["GREETING"], env["QUOTED"])
        )
        spawned = "import subprocess; subprocess.check_output(['sh', '-c', 'echo $GREETING']).decode()"
        assert sb.run_code(spawned).result == repr("hello from create\n")
        assert (
            sb.commands.run("echo $GREETING; echo $QUOTED").stdout == f"{env['GREETING']}\n{env['QUOTED']}\n"
        )
        # The BLAS cap every gVisor sandbox gets is still there beside the create's env.
        assert sb.commands.run("echo $OPENBLAS_NUM_THREADS").stdout == "1\n"


def test_a_pooled_gvisor_sandbox_whose_container_died_is_not_handed_out(
    ready_gvisor: tuple[str, Path],
) -> None:
    url, state = ready_gvisor
    before = wait_ready(url, SIZE)
    waiting = sandbox_pids(state)
    assert len(waiting) == SIZE  # the module's other sandboxes are gone: these are the pool's
    for pid in waiting.values():
        fd = os.pidfd_open(pid)
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        # Dead, not dying: a Go process with threads and a memory file takes milliseconds to exit.
        assert select.select([fd], [], [], 10)[0], f"runsc sandbox process {pid} did not exit"
        os.close(fd)
    with Sandbox.create("python-ds", url=url) as sb:  # at once: the daemon may not have seen them die
        assert "ready" not in sb.info.timings_ms and sb.id not in waiting
        assert sb.run_code("1+1").result == "2"
    after = ready_metrics(url)
    assert (after.hits - before.hits, after.misses - before.misses) == (0, 1)
    wait_ready(url, SIZE)  # the dead are destroyed and replaced
    assert not set(waiting) & set(sandbox_pids(state))
