"""The README's main job, through the real CLI binary (embedded daemon, real VM)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

TARTARUS = Path(sys.executable).parent / "tartarus"


def _run(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TARTARUS_STATE_DIR": str(state)}
    env.pop("TARTARUS_URL", None)
    return subprocess.run([str(TARTARUS), *args], capture_output=True, text=True, timeout=240, env=env)


def test_run_prints_ok_from_a_guest_kernel(tmp_path: Path) -> None:
    code = "import numpy, pandas, sklearn, os; print('ok'); print(os.uname().release)"
    proc = _run("run", "--template", "python-ds", "--", "python3", "-c", code, state=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ok, release = proc.stdout.split()
    assert ok == "ok" and release != platform.release()
    # The embedded daemon cleaned up after itself; its state dir stays for the next run (node, key).
    slot = tmp_path / "embedded" / "slot-0"
    assert not any((slot / "sandboxes").iterdir())
    assert (slot / "node-id").exists() and (slot / "admin.key").exists()


def test_run_exits_with_the_commands_status_and_streams_stderr(tmp_path: Path) -> None:
    proc = _run("run", "-t", "python-ds", "--", "sh", "-c", "echo to-err >&2; exit 42", state=tmp_path)
    assert proc.returncode == 42
    assert "to-err" in proc.stderr


def test_run_unknown_template_is_a_clear_error(tmp_path: Path) -> None:
    proc = _run("run", "--template", "no-such-template", "--", "true", state=tmp_path)
    assert proc.returncode == 2
    assert "no-such-template" in proc.stderr and "Traceback" not in proc.stderr


def _cli(*args: str, url: str) -> str:
    env = {**os.environ, "TARTARUS_URL": url}
    proc = subprocess.run([str(TARTARUS), *args], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_hibernate_wake_snapshot_and_fork_from_the_cli(daemon_url: str) -> None:
    sandbox_id = _cli("sandbox", "create", "python-ds", url=daemon_url).strip()
    try:
        _cli("sandbox", "exec", sandbox_id, "--", "sh", "-c", "echo kept > /root/f", url=daemon_url)
        assert "hibernated (" in _cli("sandbox", "hibernate", sandbox_id, url=daemon_url)
        assert f"{sandbox_id}" in _cli("sandbox", "ls", url=daemon_url)
        assert _cli("sandbox", "wake", sandbox_id, url=daemon_url).split() == [sandbox_id, "running"]
        checkpoint = _cli("sandbox", "snapshot", sandbox_id, "--ttl", "60", url=daemon_url).strip()
        assert checkpoint in _cli("checkpoint", "ls", url=daemon_url)
        forks = _cli("sandbox", "fork", sandbox_id, "-n", "2", url=daemon_url).split()
        assert len(forks) == 2
        for fork in forks:
            out = _cli("sandbox", "exec", fork, "--", "cat", "/root/f", url=daemon_url)
            assert out == "kept\n"
        _cli("sandbox", "kill", *forks, url=daemon_url)
        _cli("checkpoint", "rm", checkpoint, url=daemon_url)
        assert checkpoint not in _cli("checkpoint", "ls", url=daemon_url)
        assert _cli("gc", url=daemon_url).startswith("removed ")
    finally:
        _cli("sandbox", "kill", sandbox_id, url=daemon_url)


def test_shell_is_an_interactive_terminal_that_follows_the_local_one(daemon_url: str) -> None:
    """`sandbox shell` on a local pseudo-terminal: raw keys, the local size, SIGWINCH, exit status,
    and the local terminal's settings restored afterwards."""
    import fcntl
    import re
    import select
    import signal
    import struct
    import termios
    import time

    def set_size(fd: int, rows: int, cols: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    sandbox_id = _cli("sandbox", "create", "python-ds", url=daemon_url).strip()
    master, slave = os.openpty()
    try:
        set_size(slave, 33, 99)
        before = termios.tcgetattr(slave)
        env = {**os.environ, "TARTARUS_URL": daemon_url}
        proc = subprocess.Popen(
            [str(TARTARUS), "sandbox", "shell", sandbox_id], stdin=slave, stdout=slave, stderr=slave, env=env
        )
        seen = b""

        def expect(pattern: bytes) -> None:
            nonlocal seen
            deadline = time.monotonic() + 120
            while not re.search(pattern, seen):
                assert time.monotonic() < deadline, f"no {pattern!r} in {seen!r}"
                if select.select([master], [], [], 1)[0]:
                    seen += os.read(master, 65536)

        os.write(master, b"stty size; echo mark-$((1+1))\n")
        expect(rb"33 99\r\n(\r\n)?mark-2")
        set_size(slave, 41, 121)
        proc.send_signal(signal.SIGWINCH)
        os.write(master, b"stty size; echo mark-$((2+2))\n")
        expect(rb"41 121\r\n(\r\n)?mark-4")
        os.write(master, b"sh -c 'echo slept-$((1+2)); exec sleep 1000'\n")  # far beyond the waits
        expect(rb"slept-3")
        os.write(master, b"\x03")  # raw mode: ^C goes to the sandbox, not to the CLI
        os.write(master, b"exit 3\n")
        assert proc.wait(timeout=120) == 3, seen
        assert termios.tcgetattr(slave) == before  # raw mode undone
    finally:
        os.close(master)
        os.close(slave)
        _cli("sandbox", "kill", sandbox_id, url=daemon_url)
