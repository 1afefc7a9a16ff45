"""Sandbox lifecycle against real VMs: isolation, concurrency, crashes, cleanup, daemon restarts."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tartarus.daemon.server import daemon_thread
from tartarus.errors import SandboxFailed
from tartarus.sandbox.sandbox import Sandbox as HostSandbox
from tartarus.sdk import AsyncSandbox, Sandbox
from tartarus.templates.built import Template
from tests.conftest import qemu_pids, wait_until


def test_four_sandboxes_at_once_are_isolated(daemon_url: str) -> None:
    def one(i: int) -> tuple[str, str, str]:
        with Sandbox.create("python-ds", url=daemon_url) as sb:
            sb.files.write("/tmp/who", f"sandbox-{i}")
            host = sb.commands.run("hostname").stdout.strip()
            files = sb.commands.run("cat /tmp/who; ls /tmp").stdout
            return sb.id, host, files

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert len({r[0] for r in results}) == 4
    for i, (sid, host, files) in enumerate(results):
        assert host == sid  # each VM has its own hostname
        assert files.startswith(f"sandbox-{i}")  # and sees only its own file


def test_guest_kernel_panic_is_a_clear_error(daemon_url: str) -> None:
    with Sandbox.create("python-ds", url=daemon_url) as sb:
        with pytest.raises(SandboxFailed, match="panic"):
            sb.commands.run("echo c > /proc/sysrq-trigger; sleep 30")
        info = sb.refresh()
        assert info.state == "failed" and "panic" in (info.error or "")
        with pytest.raises(SandboxFailed):
            sb.commands.run("true")


def test_killed_agent_is_a_clear_error_and_comes_back(daemon_url: str) -> None:
    with Sandbox.create("python-ds", url=daemon_url) as sb:
        # The agent serving us is the child of PID 1; kill it from inside the guest.
        with pytest.raises(SandboxFailed, match="agent"):
            sb.commands.run("kill -9 $PPID; sleep 30")
        # init restarted it (its HELLO is what failed the request above): the sandbox serves again.
        assert sb.commands.run("echo back").stdout == "back\n"
        assert sb.refresh().state == "running"


def test_destroy_leaves_nothing_behind(daemon_url: str, daemon_state: Path) -> None:
    sb = Sandbox.create("python-ds", url=daemon_url)
    workdir = daemon_state / "sandboxes" / sb.id
    assert workdir.is_dir() and (workdir / "rw.ext4").exists()
    pid = int((workdir / "qemu.pid").read_text())
    assert pid in qemu_pids(workdir)
    sb.kill()
    assert not workdir.exists()
    assert not Path(f"/proc/{pid}").exists()


def test_restarted_daemon_reaps_what_a_dead_one_left(tmp_path: Path) -> None:
    """A daemon killed with SIGKILL leaves files only (its VMs die with it); the next one cleans them."""
    state = tmp_path / "state"
    script = f"""
import os, signal
from tartarus.daemon.server import daemon_thread
from tartarus.sdk import Sandbox
from pathlib import Path
with daemon_thread(Path({str(state)!r}), Path({str(tmp_path / "a.sock")!r})):
    sb = Sandbox.create("python-ds", url="unix://{tmp_path / "a.sock"}")
    print(sb.id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    sandbox_id = proc.stdout.strip()
    assert sandbox_id.startswith("sb-"), proc.stderr
    assert (state / "sandboxes" / sandbox_id).is_dir()  # the dead daemon left its files
    # Its VMMs (the sandbox's and any pooled ones) died with it: parent-death signal.
    assert wait_until(lambda: not qemu_pids(state), 5.0)
    with daemon_thread(state, tmp_path / "b.sock"):
        assert not (state / "sandboxes" / sandbox_id).exists()
        assert Sandbox.list(url=f"unix://{tmp_path / 'b.sock'}") == []


def test_async_sdk(daemon_url: str) -> None:
    async def main() -> tuple[str, bytes, int | None]:
        async with await AsyncSandbox.create("python-ds", url=daemon_url) as sb:
            await sb.files.write("/tmp/a.txt", b"async bytes")
            result = await sb.commands.run("cat /tmp/a.txt; exit 7")
            return result.stdout, await sb.files.read("/tmp/a.txt"), result.exit_code

    stdout, data, code = asyncio.run(main())
    assert stdout == "async bytes" and data == b"async bytes" and code == 7


def test_runtime_boot_failure_cleans_up(python_ds: Template, tmp_path: Path) -> None:
    """A guest that cannot mount its root powers off with a message; nothing is left behind."""
    broken = Template(**{**python_ds.__dict__, "fstype": "erofs"})  # ext4 image, wrong fs type

    async def boot() -> None:
        await HostSandbox.boot(broken, tmp_path)

    with pytest.raises(SandboxFailed, match="tartarus-agent"):
        asyncio.run(boot())
    assert list(tmp_path.iterdir()) == []
    assert not qemu_pids(tmp_path)


def test_vmm_that_cannot_start_is_a_clear_error(python_ds: Template, tmp_path: Path) -> None:
    """QEMU refusing its configuration (here: a missing base image) surfaces QEMU's own words."""
    missing = Template(**{**python_ds.__dict__, "rootfs": tmp_path / "no-such-rootfs.img"})

    async def boot() -> None:
        await HostSandbox.boot(missing, tmp_path / "sandboxes")

    with pytest.raises(SandboxFailed, match=r"(?s)VMM failed to start.*no-such-rootfs"):
        asyncio.run(boot())
    assert not qemu_pids(tmp_path)
    assert not list((tmp_path / "sandboxes").iterdir())
