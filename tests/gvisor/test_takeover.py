"""A served daemon killed with -9 and started again takes over its gVisor sandboxes as it does its VMs:
the running ones answer with their memory, files and processes intact (their runsc sandbox and the
keeper of their agent's channel outlived the daemon), the hibernated ones wake, and one whose runsc died
meanwhile is recorded lost with nothing of it left on the host. A daemon killed in the middle of a
hibernation or a wake leaves the sandbox running (before the commit point) or hibernated (after)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartarus.gvisor.container import pids_under
from tartarus.sdk import Sandbox
from tests.api.conftest import env
from tests.conftest import wait_until
from tests.gvisor.helpers import DEADLINE, host_traces, require_gvisor
from tests.network.conftest import leftovers
from tests.served import Served
from tests.vm.test_hibernation import _check_state, _give_state

pytestmark = pytest.mark.vm


@pytest.fixture
def daemons() -> Iterator[list[Served]]:
    require_gvisor()
    started: list[Served] = []
    yield started
    for d in started:
        d.stop(signal.SIGKILL)


def serve(state: Path, daemons: list[Served], *args: str, failpoints: str = "") -> Served:
    """A `tartarus serve` whose sandboxes run on gVisor."""
    with env(TARTARUS_BACKEND="gvisor"):
        daemon = Served(state, *args, failpoints=failpoints)
    daemons.append(daemon)
    return daemon


def container(state: Path, sandbox_id: str) -> list[int]:
    return pids_under(state / "sandboxes" / sandbox_id / "gvisor" / "runsc")


def test_kill_9_then_restart_takes_over_running_gvisor_sandboxes(
    tmp_path: Path, daemons: list[Served]
) -> None:
    state = tmp_path / "state"
    first = serve(state, daemons)
    running = Sandbox.create("python-ds", url=first.url, api_key=first.key, network="full")
    asleep = Sandbox.create("python-ds", url=first.url, api_key=first.key)
    doomed = Sandbox.create("python-ds", url=first.url, api_key=first.key)
    assert {s.info.backend for s in (running, asleep, doomed)} == {"gvisor"}
    # State of every kind: a Python variable, a file, a background process.
    _give_state(running)
    running.commands.run("setsid sleep 1000 >/dev/null 2>&1 < /dev/null &")
    sleeper = running.commands.run(["pgrep", "-f", "^sleep 1000$"]).stdout.split()
    assert sleeper
    _give_state(asleep)
    asleep.hibernate()
    processes = container(state, running.id)

    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert container(state, running.id) == processes  # runsc and the channel's keeper outlive it
    # One sandbox's runsc dies while no daemon runs: it cannot be taken over.
    doomed_dir = state / "sandboxes" / doomed.id
    sandbox_pid = int((doomed_dir / "gvisor" / "sandbox.pid").read_text())
    pidfd = os.pidfd_open(sandbox_pid)
    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    assert wait_until(lambda: sandbox_pid not in container(state, doomed.id), DEADLINE)

    second = serve(state, daemons)
    listed = {s.id: s for s in Sandbox.list(url=second.url, api_key=second.key, include_ended=True)}
    assert listed[running.id].state == "running" and listed[running.id].backend == "gvisor"
    assert listed[running.id].network == "full"
    assert listed[asleep.id].state == "hibernated"
    assert listed[doomed.id].state == "lost"
    # The same container, taken over: memory, files and processes as they were.
    again = Sandbox.connect(running.id, url=second.url, api_key=second.key)
    _check_state(again)
    assert again.commands.run(["pgrep", "-f", "^sleep 1000$"]).stdout.split() == sleeper
    assert container(state, running.id) == processes
    # The hibernated one wakes on its first call, under the new daemon.
    _check_state(Sandbox.connect(asleep.id, url=second.url, api_key=second.key))
    # The dead one was reaped whole: processes (its keeper too), namespaces, cgroups, directory.
    assert host_traces(doomed_dir) == [] and leftovers(doomed.id) == []
    # A taken-over sandbox is managed like any other: it hibernates, wakes and is destroyed.
    assert again.hibernate().state == "hibernated"
    _check_state(again)
    again.kill()
    second.stop(signal.SIGTERM)
    for sandbox_id in (running.id, asleep.id, doomed.id):  # a graceful stop ends what it runs
        assert host_traces(state / "sandboxes" / sandbox_id) == [] and leftovers(sandbox_id) == []


@pytest.mark.parametrize(
    ("step", "hibernate_first", "then"),
    [
        ("hibernate.pinned", False, "running"),
        ("hibernate.captured", False, "running"),
        ("hibernate.committed", False, "hibernated"),
        ("wake.committed", True, "hibernated"),
        ("wake.resumed", True, "hibernated"),
    ],
)
def test_a_daemon_killed_mid_hibernation_or_wake_leaves_it_whole(
    tmp_path: Path, daemons: list[Served], step: str, hibernate_first: bool, then: str
) -> None:
    """Before its commit point a hibernating sandbox runs on (its capture left it running) and the next
    daemon takes it over; after, it is hibernated. A wake cut short at any step leaves it hibernated:
    its image is never written, and what the dead daemon restored is reaped."""
    state = tmp_path / "state"
    first = serve(state, daemons, failpoints=f"{step}=exit")
    sb = Sandbox.create("python-ds", url=first.url, api_key=first.key)
    _give_state(sb)
    if hibernate_first:
        sb.hibernate()
    with pytest.raises(Exception):  # noqa: B017 - the daemon dies under the call
        sb.wake() if hibernate_first else sb.hibernate()
    assert first.proc.wait(timeout=DEADLINE) == 137

    second = serve(state, daemons)
    again = Sandbox.connect(sb.id, url=second.url, api_key=second.key)
    assert again.info.state == then
    assert not (state / "sandboxes" / f".{sb.id}.waking").exists()
    assert not (state / "sandboxes" / sb.id / "hibernating").exists()
    if then == "hibernated":
        assert host_traces(state / "sandboxes" / sb.id) == [] and leftovers(sb.id) == []
    _check_state(again)  # woken if it was hibernated
    again.kill()
    assert host_traces(state / "sandboxes" / sb.id) == [] and leftovers(sb.id) == []
    assert not (state / "hibernated" / sb.id).exists()


def test_a_clean_stop_with_keep_sandboxes_hands_them_to_the_next_daemon(
    tmp_path: Path, daemons: list[Served]
) -> None:
    state = tmp_path / "state"
    first = serve(state, daemons, "--keep-sandboxes")
    sb = Sandbox.create("python-ds", url=first.url, api_key=first.key)
    sb.run_code("kept = [1, 2, 3]")
    processes = container(state, sb.id)
    first.stop(signal.SIGTERM)
    assert container(state, sb.id) == processes
    second = serve(state, daemons)
    again = Sandbox.connect(sb.id, url=second.url, api_key=second.key)
    assert again.info.state == "running"
    assert again.run_code("kept").result == "[1, 2, 3]"
    second.stop(signal.SIGTERM)  # without the flag: its sandboxes end with it
    assert host_traces(state / "sandboxes" / sb.id) == [] and leftovers(sb.id) == []
