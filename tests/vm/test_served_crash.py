"""A `tartarus serve` daemon killed (-9, by a failpoint) just after a commit point. Its VMMs outlive it by
design, so the next daemon meets the half-done operation's VMM as well as its files: it must find the
sandbox in exactly one state, hibernated with its memory, files and processes, and leave nothing of the
operation behind (no VMM, no directory)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartarus.errors import TartarusError
from tartarus.sdk import Sandbox
from tests.conftest import qemu_pids, wait_until
from tests.served import Served
from tests.vm.test_hibernation import _check_state, _give_state

pytestmark = pytest.mark.vm


@pytest.fixture
def served(tmp_path: Path) -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for daemon in started:
        daemon.stop(signal.SIGKILL)


@pytest.mark.parametrize(
    ("step", "pool_size"),
    [("hibernate.committed", 0), ("wake.committed", 0), ("wake.committed", 1)],
    ids=["hibernate", "wake-own-vmm", "wake-pooled-vmm"],
)
def test_served_daemon_killed_after_the_commit_point(
    tmp_path: Path, served: list[Served], step: str, pool_size: int
) -> None:
    """After hibernation commits, the image is the sandbox and the VMM it left paused is not (the next
    daemon reaps it rather than take it over). When a wake commits, its guest has not run yet: the image,
    moved to `.<id>.waking` with the paused VMM's layer, is still the sandbox and goes back to
    `hibernated/` (the old clean-up deleted it with the VMM's directories: the sandbox was gone)."""
    state = tmp_path / "state"
    sandboxes = state / "sandboxes"
    first = Served(state, pool_size=pool_size, failpoints=f"{step}=exit")
    served.append(first)
    sb = Sandbox.create("python-ds", url=first.url, api_key=first.key)
    _give_state(sb)
    waking = step.startswith("wake.")
    if waking:
        sb.hibernate()
        assert wait_until(lambda: first.pooled() >= pool_size, timeout=120), "the pool never filled"
    with pytest.raises(TartarusError):
        sb.wake() if waking else sb.hibernate()
    assert first.stop() == 137  # the failpoint ended it, as kill -9 would
    assert qemu_pids(state), "the half-done operation's VMM outlives its daemon"
    assert (sandboxes / f".{sb.id}.waking").exists() is waking
    assert (state / "hibernated" / sb.id).exists() is not waking

    second = Served(state, pool_size=0)
    served.append(second)
    assert not qemu_pids(state)  # the paused VMM (and the first daemon's pooled ones) reaped
    assert not list(sandboxes.iterdir())  # no `.waking`, no working directory
    listed = {s.id: s.state for s in Sandbox.list(url=second.url, api_key=second.key)}
    assert listed == {sb.id: "hibernated"}
    again = Sandbox.connect(sb.id, url=second.url, api_key=second.key)
    _check_state(again)  # woken: memory, files and the running process as they were hibernated
    again.kill()
    assert not list(sandboxes.iterdir())
    assert not (state / "hibernated" / sb.id).exists()
    second.stop()  # a clean stop (SIGTERM) ends what it runs
    assert not qemu_pids(state)
