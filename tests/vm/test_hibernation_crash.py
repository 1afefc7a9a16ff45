"""Hibernation and wake are never half done: a failure at each step, a daemon killed at each step, and a
daemon restart leave every sandbox running or cleanly hibernated, with its state."""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartarus import failpoints
from tartarus.daemon.server import daemon_thread
from tartarus.errors import InsufficientStorage, TartarusError
from tartarus.sdk import Sandbox
from tests.conftest import qemu_pids, wait_until
from tests.vm.test_hibernation import _check_state, _give_state

HIBERNATE_STEPS = ["hibernate.pinned", "hibernate.captured", "hibernate.layer_moved"]


@pytest.fixture
def disarmed() -> Iterator[None]:
    yield
    failpoints.disarm()


@contextlib.contextmanager
def fails_at(
    step: str, caplog: pytest.LogCaptureFixture, message: str = r"internal error \(request "
) -> Iterator[None]:
    """The call fails with a 500 naming only its request id (or, for a capture, that it was undone);
    the daemon's log has the failpoint."""
    with caplog.at_level(logging.ERROR), pytest.raises(TartarusError, match=message):
        yield
    assert f"failpoint {step}" in caplog.text


@pytest.mark.parametrize("step", HIBERNATE_STEPS)
def test_failed_hibernation_leaves_it_running(
    daemon_url: str, step: str, disarmed: None, caplog: pytest.LogCaptureFixture
) -> None:
    with Sandbox.create("python-ds", url=daemon_url) as sb:
        _give_state(sb)
        failpoints.arm(step)
        with fails_at(step, caplog, "hibernate of .* failed and was undone: the sandbox keeps running"):
            sb.hibernate()
        failpoints.disarm()
        assert sb.refresh().state == "running"
        _check_state(sb)
        assert sb.hibernate().state == "hibernated"  # and it can still hibernate
        _check_state(sb)


def test_failure_after_the_commit_point_rolls_forward(daemon_url: str, disarmed: None) -> None:
    with Sandbox.create("python-ds", url=daemon_url) as sb:
        _give_state(sb)
        failpoints.arm("hibernate.committed")
        assert sb.hibernate().state == "hibernated"
        failpoints.disarm()
        _check_state(sb)


@pytest.mark.parametrize("step", ["restore.loaded", "wake.committed"])
def test_failed_wake_leaves_it_hibernated(
    daemon_url: str, step: str, disarmed: None, caplog: pytest.LogCaptureFixture
) -> None:
    with Sandbox.create("python-ds", url=daemon_url) as sb:
        _give_state(sb)
        sb.hibernate()
        failpoints.arm(step)
        with fails_at(step, caplog):
            sb.wake()
        failpoints.disarm()
        assert sb.refresh().state == "hibernated"
        _check_state(sb)


def test_hibernated_sandboxes_survive_a_daemon_restart(tmp_path: Path) -> None:
    state, sock = tmp_path / "state", tmp_path / "api.sock"
    with daemon_thread(state, sock):
        sb = Sandbox.create("python-ds", url=f"unix://{sock}", idle_timeout=3600)
        _give_state(sb)
        sb.hibernate()
        running = Sandbox.create("python-ds", url=f"unix://{sock}")
    assert not qemu_pids(state)
    with daemon_thread(state, sock):
        listed = {s.id: s.state for s in Sandbox.list(url=f"unix://{sock}")}
        assert listed == {sb.id: "hibernated"}, "running sandboxes end with their daemon"
        assert running.id not in listed
        again = Sandbox.connect(sb.id, url=f"unix://{sock}")
        assert again.info.idle_timeout_s == 3600  # it will hibernate again when idle
        _check_state(again)
        again.kill()
    assert not qemu_pids(state)


def _daemon_dies_at(
    tmp_path: Path,
    step: str,
    hibernate_first: bool,
    *,
    live_restore: bool = False,
    pool_size: int | None = None,
) -> str:
    """Run a daemon that exits abruptly (like kill -9) at `step`; returns the sandbox id it had.
    With `live_restore` (as `tartarus serve` runs) its VMMs outlive it. Given a `pool_size`, the
    fatal operation waits for the pool to fill, so that a wake takes a pooled VMM (and swaps its layer
    in) if there is a pool, and starts its own if there is none."""
    pool = {} if pool_size is None else {"pool_size": pool_size}
    state, sock = tmp_path / "state", tmp_path / "a.sock"
    script = f"""
import os
from pathlib import Path
import httpx
from tartarus import failpoints
from tartarus.daemon.server import daemon_thread
from tartarus.daemon.config import DaemonConfig
from tartarus.hibernation import reflink
from tartarus.sdk import Sandbox
from tests.conftest import wait_until
from tests.vm.test_hibernation import _give_state
config = DaemonConfig(live_restore={live_restore!r}, **{pool!r})
health = httpx.Client(transport=httpx.HTTPTransport(uds={str(sock)!r}), base_url="http://daemon")
with daemon_thread(Path({str(state)!r}), Path({str(sock)!r}), config):
    sb = Sandbox.create("python-ds", url="unix://{sock}")
    _give_state(sb)
    if {hibernate_first!r}:
        sb.hibernate()
    pooled = lambda: health.get("/v1/health").json()["pooled"] >= config.pool_size
    assert {pool_size is None!r} or wait_until(pooled, 120), "the pool never filled"
    if {pool_size is not None!r} and {hibernate_first!r} and reflink.supported(Path({str(tmp_path)!r})):
        # the wake takes a spare of the lazy pool the hibernation made (its VMMs map a memory.ram)
        files = lambda: Path({str(state)!r}).glob("sandboxes/*/memory.ram")
        spares = lambda: [m for m in files() if (m.parent / "qemu.pid").exists()]
        assert wait_until(lambda: len(spares()) >= config.pool_size, 120), "the lazy pool never filled"
    print(sb.id, flush=True)
    failpoints.arm({step!r}, "exit")
    sb.wake() if {hibernate_first!r} else sb.hibernate()
    print("survived", flush=True)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=Path.cwd()
    )
    assert proc.returncode == 137, proc.stderr
    sandbox_id = proc.stdout.split()[0]
    if not live_restore:
        assert wait_until(lambda: not qemu_pids(state), 5.0)  # VMMs die with their daemon
    return sandbox_id


@pytest.mark.parametrize("step", HIBERNATE_STEPS)
def test_daemon_killed_before_hibernation_commits(tmp_path: Path, step: str) -> None:
    """Before the commit point the sandbox is a running one, and an embedded daemon's sandboxes die with it
    (their VMMs carry a parent-death signal): the next daemon must find no trace of it, not half of it."""
    sandbox_id = _daemon_dies_at(tmp_path, step, hibernate_first=False)
    state, sock = tmp_path / "state", tmp_path / "b.sock"
    with daemon_thread(state, sock):
        assert Sandbox.list(url=f"unix://{sock}") == []
        assert not list((state / "sandboxes").glob(f"*{sandbox_id}*"))  # pooled VMMs' dirs aside
        assert not (state / "hibernated" / sandbox_id).exists()


@pytest.mark.parametrize("step", HIBERNATE_STEPS)
def test_served_daemon_killed_before_hibernation_commits_leaves_it_running(tmp_path: Path, step: str) -> None:
    """A served daemon's VMM outlives it, paused mid-capture: the next daemon puts the layer back,
    resumes the guest and takes the sandbox over, state intact."""
    from tartarus.daemon.config import DaemonConfig

    sandbox_id = _daemon_dies_at(tmp_path, step, hibernate_first=False, live_restore=True)
    state, sock = tmp_path / "state", tmp_path / "b.sock"
    assert qemu_pids(state)
    with daemon_thread(state, sock, DaemonConfig(live_restore=True)):
        listed = {s.id: s.state for s in Sandbox.list(url=f"unix://{sock}")}
        assert listed == {sandbox_id: "running"}
        assert not (state / "hibernated" / sandbox_id).exists()
        sb = Sandbox.connect(sandbox_id, url=f"unix://{sock}")
        _check_state(sb)
        assert sb.hibernate().state == "hibernated"  # and it can hibernate after all
        _check_state(sb)
        sb.kill()
    assert not qemu_pids(state)


@pytest.mark.parametrize(
    ("step", "hibernate_first"),
    [("hibernate.committed", False), ("restore.loaded", True)],
)
def test_daemon_killed_after_commit_or_before_wake_commits(
    tmp_path: Path, step: str, hibernate_first: bool
) -> None:
    sandbox_id = _daemon_dies_at(tmp_path, step, hibernate_first)
    state, sock = tmp_path / "state", tmp_path / "b.sock"
    with daemon_thread(state, sock):
        listed = {s.id: s.state for s in Sandbox.list(url=f"unix://{sock}")}
        assert listed == {sandbox_id: "hibernated"}
        sb = Sandbox.connect(sandbox_id, url=f"unix://{sock}")
        _check_state(sb)
        sb.kill()
        assert not list((state / "sandboxes").glob(f"*{sandbox_id}*"))
        assert not (state / "hibernated" / sandbox_id).exists()


@pytest.mark.parametrize("pooled", [False, True], ids=["own-vmm", "pooled-vmm"])
def test_daemon_killed_when_wake_commits_leaves_it_hibernated(tmp_path: Path, pooled: bool) -> None:
    """Killed at its commit point, a wake has moved the image out of `hibernated/` (to `.<id>.waking`,
    where the VMM's layer is) but its guest has not run: that image is still the whole sandbox, which
    the next daemon puts back, where the old one reaped it with the leftovers (the sandbox was gone).
    Both ways a wake starts: its own VMM on the image's layer, or a pooled one given that layer."""
    from tartarus.daemon.config import DaemonConfig

    sandbox_id = _daemon_dies_at(tmp_path, "wake.committed", True, pool_size=2 if pooled else 0)
    state, sock = tmp_path / "state", tmp_path / "b.sock"
    sandboxes = state / "sandboxes"
    assert (sandboxes / f".{sandbox_id}.waking" / "layer.ext4").exists()
    assert not (state / "hibernated" / sandbox_id).exists()
    assert (sandboxes / sandbox_id).exists() is not pooled  # a pooled VMM's directory keeps its name
    with daemon_thread(state, sock, DaemonConfig(pool_size=0)):
        assert not list(sandboxes.iterdir())  # no .waking, no VMM directory
        listed = {s.id: s.state for s in Sandbox.list(url=f"unix://{sock}")}
        assert listed == {sandbox_id: "hibernated"}
        sb = Sandbox.connect(sandbox_id, url=f"unix://{sock}")
        _check_state(sb)  # woken: memory, files and process as they were hibernated
        sb.kill()
        assert not list(sandboxes.iterdir())
        assert not (state / "hibernated" / sandbox_id).exists()
    assert not qemu_pids(state)


def test_daemon_killed_after_the_woken_guest_ran_loses_it_cleanly(tmp_path: Path) -> None:
    """Once its guest has run, a waking sandbox's memory is only in its VMM (the image's is older than
    its layer now), which dies with an embedded daemon: the next daemon must not publish that image
    again (a disk changed under the guest's page cache), and leaves nothing of it."""
    from tartarus.daemon.config import DaemonConfig

    sandbox_id = _daemon_dies_at(tmp_path, "wake.resumed", True, pool_size=0)
    state, sock = tmp_path / "state", tmp_path / "b.sock"
    sandboxes = state / "sandboxes"
    assert (sandboxes / f".{sandbox_id}.waking" / "layer.ext4").exists()
    with daemon_thread(state, sock, DaemonConfig(pool_size=0)):
        assert Sandbox.list(url=f"unix://{sock}") == []
        assert not list(sandboxes.iterdir())
        assert not (state / "hibernated" / sandbox_id).exists()
    assert not qemu_pids(state)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 GiB ext4 filesystem of its own, for a state directory that can really fill up."""
    image, mount = tmp_path / "disk.img", tmp_path / "mnt"
    subprocess.run(["truncate", "-s", "4G", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)  # no blocks kept for root
    mount.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_is_a_clear_error_and_loses_nothing(small_disk: Path) -> None:
    from tartarus.daemon.config import DaemonConfig

    state, sock = small_disk / "state", small_disk / "api.sock"
    with daemon_thread(state, sock, DaemonConfig(pool_size=0)):
        sb = Sandbox.create("python-ds", url=f"unix://{sock}")
        _give_state(sb)
        sb.run_code("import os\nballast = os.urandom(64 << 20)")  # a capture needs > 64 MiB
        sb.snapshot()  # pins the template snapshot on this disk (copied: another filesystem)
        filler = small_disk / "filler"
        free = shutil.disk_usage(small_disk).free
        subprocess.run(["fallocate", "-l", str(free - (16 << 20)), str(filler)], check=True)
        with pytest.raises(InsufficientStorage, match="keeps running"):
            sb.hibernate()
        assert sb.refresh().state == "running"
        assert not (state / "sandboxes" / sb.id / "hibernating").exists()
        _check_state(sb)
        filler.unlink()
        assert sb.hibernate().state == "hibernated"
        _check_state(sb)
        sb.kill()


def test_storage_quota_refuses_before_writing(tmp_path: Path) -> None:
    from tartarus.daemon.config import DaemonConfig
    from tartarus.errors import QuotaExceeded

    state, sock = tmp_path / "state", tmp_path / "api.sock"
    config = DaemonConfig(pool_size=0, hibernate_quota_bytes=256 << 20)  # less than the guest's RAM
    with daemon_thread(state, sock, config), Sandbox.create("python-ds", url=f"unix://{sock}") as sb:
        sb.run_code("x = 'still here'")
        with pytest.raises(QuotaExceeded, match="keeps running"):
            sb.hibernate()
        with pytest.raises(QuotaExceeded):
            sb.snapshot()
        assert sb.run_code("x").result == "'still here'"
        assert sb.refresh().state == "running"
        assert not list(state.glob("hibernated/*")) and not list(state.glob("checkpoints/*"))
