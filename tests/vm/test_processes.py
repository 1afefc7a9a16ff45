"""Running commands addressed by their guest pid, in a real VM through the daemon's REST API and the SDK:
background commands outlive their stream, are listed with the guest's pid, take stdin and signals by
pid and can be followed again; a command started by /exec still dies with its stream."""

from __future__ import annotations

import errno
import json
import signal
import time
from collections.abc import Callable

import pytest

from tartarus.errors import GuestError
from tartarus.sdk import Sandbox

DEADLINE = 60.0  # a condition polled for under TCG; each wait ends as soon as it holds


def _listed(sandbox: Sandbox) -> dict[int, tuple[str, ...]]:
    return {p.pid: p.argv for p in sandbox.commands.list()}


def _until(condition: str, check: Callable[[], bool]) -> None:
    end = time.monotonic() + DEADLINE
    while not check():
        assert time.monotonic() < end, f"not within {DEADLINE} s: {condition}"
        time.sleep(0.1)


def test_a_background_command_is_listed_followed_fed_and_closed(sandbox: Sandbox) -> None:
    started = sandbox.commands.start(["cat"], stdin=True, cwd="/tmp")
    started.disconnect()  # it runs on
    (info,) = [p for p in sandbox.commands.list() if p.pid == started.pid]
    assert info.argv == ("cat",) and info.cwd == "/tmp" and info.background and info.stdin
    # the pid is the guest's own: the command's /proc entry names it
    assert sandbox.commands.run(f"cat /proc/{started.pid}/comm").stdout == "cat\n"
    follower = sandbox.commands.connect(started.pid)
    sandbox.commands.send_stdin(started.pid, b"echo through the pid\n")
    sandbox.commands.close_stdin(started.pid)  # cat reads end of file and exits
    result = follower.wait()
    assert (result.stdout, result.exit_code) == ("echo through the pid\n", 0)
    assert started.pid not in _listed(sandbox)


def test_a_signal_by_pid_ends_a_sleep_with_that_signal(sandbox: Sandbox) -> None:
    sleeper = sandbox.commands.start(["sleep", "300"])
    sandbox.commands.signal(sleeper.pid, "SIGTERM")
    result = sleeper.wait()
    assert (result.exit_code, result.signal) == (None, signal.SIGTERM)
    killed = sandbox.commands.start(["sleep", "300"])
    sandbox.commands.kill(killed.pid)
    assert killed.wait().signal == signal.SIGKILL


def test_only_an_exec_command_dies_with_its_stream(sandbox: Sandbox) -> None:
    background = sandbox.commands.start(["sleep", "300"])
    background.disconnect()
    lines = sandbox._client.stream_lines(
        "POST", f"/v1/sandboxes/{sandbox.id}/exec", json={"argv": ["sleep", "300"]}
    )
    attached = json.loads(next(lines))["pid"]  # /exec's first event: started, with the pid
    assert attached in _listed(sandbox)
    lines.close()  # type: ignore[attr-defined]  # the /exec stream ends: its command is killed
    # ... while the background one runs on
    _until("the /exec command is gone", lambda: attached not in _listed(sandbox))
    assert background.pid in _listed(sandbox)
    sandbox.commands.kill(background.pid)
    _until("the killed command is gone", lambda: background.pid not in _listed(sandbox))


def test_an_unknown_pid_or_a_closed_stdin_is_a_guest_error(sandbox: Sandbox) -> None:
    with pytest.raises(GuestError) as unknown:
        sandbox.commands.send_stdin(999_999, b"x")
    assert unknown.value.errno == errno.ESRCH
    no_stdin = sandbox.commands.start(["sleep", "300"])
    with pytest.raises(GuestError) as closed:
        sandbox.commands.send_stdin(no_stdin.pid, b"x")
    assert closed.value.errno == errno.EPIPE
    sandbox.commands.kill(no_stdin.pid)
    assert no_stdin.wait().signal == signal.SIGKILL
