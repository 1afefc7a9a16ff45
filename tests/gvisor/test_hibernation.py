"""Hibernation, wake, checkpoints and forks of gVisor sandboxes through the daemon's API, with the
VM path's commit points: a failure before the commit leaves the sandbox running, after it the sandbox
is hibernated and wakes; a wake that fails leaves it hibernated; a restarted daemon finds it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartarus import failpoints
from tartarus.daemon.config import DaemonConfig
from tartarus.daemon.server import daemon_thread
from tartarus.errors import TartarusError
from tartarus.gvisor.container import pids_under
from tartarus.sdk import Sandbox
from tests.conftest import wait_until
from tests.gvisor.helpers import host_traces, require_gvisor
from tests.network.conftest import leftovers
from tests.vm.test_hibernation import _check_state, _give_state

pytestmark = pytest.mark.vm

CONFIG = DaemonConfig(pool_size=0, backend="gvisor")


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_gvisor()
    return tmp_path_factory.mktemp("gvisor-hibernation")


@pytest.fixture(scope="module")
def url(state: Path) -> Iterator[str]:
    """A daemon whose sandboxes run on gVisor."""
    uds = state / "api.sock"
    with daemon_thread(state, uds, CONFIG):
        yield f"unix://{uds}"


@pytest.fixture
def disarmed() -> Iterator[None]:
    yield
    failpoints.disarm()


def processes(state: Path, sandbox_id: str) -> list[int]:
    return pids_under(state / "sandboxes" / sandbox_id / "gvisor" / "runsc")


def test_hibernate_and_wake_keep_memory_processes_and_files(url: str, state: Path) -> None:
    with Sandbox.create("python-ds", url=url) as sb:
        assert sb.info.backend == "gvisor"
        _give_state(sb)
        assert processes(state, sb.id) and leftovers(sb.id)
        assert sb.hibernate().state == "hibernated"
        # Nothing of it runs or is held on the host: no runsc process, namespace, cgroup or directory.
        assert host_traces(state / "sandboxes" / sb.id) == []
        assert leftovers(sb.id) == []
        assert (state / "hibernated" / sb.id / "gvisor").is_dir()
        _check_state(sb)  # the first call wakes it: memory, the counting process and the file are back
        info = sb.refresh()
        assert info.state == "running" and info.backend == "gvisor"
        assert not (state / "hibernated" / sb.id).exists()
        assert sb.commands.run("echo again").stdout == "again\n"
        # And again: a woken sandbox hibernates and wakes like a new one.
        sb.hibernate()
        assert sb.wake().state == "running"
        _check_state(sb)
    assert host_traces(state / "sandboxes" / sb.id) == [] and leftovers(sb.id) == []
    assert not (state / "hibernated" / sb.id).exists()


def test_an_idle_gvisor_sandbox_hibernates_by_itself_and_wakes_on_its_next_call(url: str) -> None:
    with Sandbox.create("python-ds", url=url, idle_timeout=1) as sb:
        sb.run_code("kept = 'across the nap'")
        assert wait_until(lambda: sb.refresh().state == "hibernated", 60)
        assert sb.run_code("kept").result == "'across the nap'"


@contextlib.contextmanager
def fails_at(step: str, caplog: pytest.LogCaptureFixture, message: str) -> Iterator[None]:
    with caplog.at_level(logging.ERROR), pytest.raises(TartarusError, match=message):
        yield
    assert f"failpoint {step}" in caplog.text


@pytest.mark.parametrize("step", ["hibernate.pinned", "hibernate.captured"])
def test_a_hibernation_that_fails_before_its_commit_leaves_it_running(
    url: str, state: Path, step: str, disarmed: None, caplog: pytest.LogCaptureFixture
) -> None:
    with Sandbox.create("python-ds", url=url) as sb:
        _give_state(sb)
        pids = processes(state, sb.id)
        failpoints.arm(step)
        with fails_at(step, caplog, "hibernate of .* failed and was undone: the sandbox keeps running"):
            sb.hibernate()
        failpoints.disarm()
        assert sb.refresh().state == "running"
        assert processes(state, sb.id) == pids  # the same container, never stopped
        assert not (state / "hibernated" / sb.id).exists()
        assert not (state / "sandboxes" / sb.id / "hibernating").exists()
        _check_state(sb)
        assert sb.hibernate().state == "hibernated"  # and it can still hibernate
        _check_state(sb)


def test_a_failure_after_the_commit_point_rolls_forward(url: str, state: Path, disarmed: None) -> None:
    with Sandbox.create("python-ds", url=url) as sb:
        _give_state(sb)
        failpoints.arm("hibernate.committed")
        assert sb.hibernate().state == "hibernated"
        failpoints.disarm()
        assert host_traces(state / "sandboxes" / sb.id) == []
        _check_state(sb)


@pytest.mark.parametrize("step", ["restore.loaded", "wake.committed", "wake.resumed"])
def test_a_wake_that_fails_leaves_it_hibernated(
    url: str, state: Path, step: str, disarmed: None, caplog: pytest.LogCaptureFixture
) -> None:
    with Sandbox.create("python-ds", url=url) as sb:
        _give_state(sb)
        sb.hibernate()
        failpoints.arm(step)
        with fails_at(step, caplog, r"internal error \(request "):
            sb.wake()
        failpoints.disarm()
        assert sb.refresh().state == "hibernated"
        assert host_traces(state / "sandboxes" / sb.id) == [] and leftovers(sb.id) == []
        assert not (state / "sandboxes" / f".{sb.id}.waking").exists()
        _check_state(sb)


def test_a_checkpoint_forks_into_running_copies_and_the_original_runs_on(url: str, state: Path) -> None:
    with Sandbox.create("python-ds", url=url) as sb:
        _give_state(sb)
        copies = sb.fork(2)
        try:
            assert {c.info.backend for c in copies} == {"gvisor"}
            assert len({sb.id, *(c.id for c in copies)}) == 3
            for i, copy in enumerate(copies):
                _check_state(copy)  # the original's memory, files and processes
                copy.files.write("/root/mine", str(i).encode())
            ids = {c.commands.run("cat /etc/machine-id").stdout for c in copies}
            assert len(ids) == 2  # each copy is a sandbox of its own
            assert not sb.files.exists("/root/mine")
            _check_state(sb)
        finally:
            for copy in copies:
                copy.kill()
    assert not list((state / "checkpoints").glob("ck-*"))  # a fork's checkpoint goes once they run


def test_hibernated_and_running_gvisor_sandboxes_across_an_embedded_daemon_restart(tmp_path: Path) -> None:
    """An embedded daemon's sandboxes end with it (its channels are its own); a hibernated one is on
    disk, and the next daemon finds it and wakes it."""
    state, uds = tmp_path / "state", tmp_path / "api.sock"
    with daemon_thread(state, uds, CONFIG):
        sb = Sandbox.create("python-ds", url=f"unix://{uds}", idle_timeout=3600)
        _give_state(sb)
        sb.hibernate()
        running = Sandbox.create("python-ds", url=f"unix://{uds}")
    assert not pids_under(state / "sandboxes" / running.id / "gvisor" / "runsc")
    with daemon_thread(state, uds, CONFIG):
        listed = {s.id: s.state for s in Sandbox.list(url=f"unix://{uds}")}
        assert listed == {sb.id: "hibernated"}
        again = Sandbox.connect(sb.id, url=f"unix://{uds}")
        _check_state(again)
        again.kill()
    assert host_traces(state / "sandboxes" / sb.id) == []
    assert host_traces(state / "sandboxes" / running.id) == []
