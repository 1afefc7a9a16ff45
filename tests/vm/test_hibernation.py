"""Hibernation, wake, checkpoints and forks of real python-ds sandboxes through the daemon's API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartarus.errors import Conflict, NotFound
from tartarus.sdk import Client, Sandbox
from tests.conftest import qemu_pids, wait_until

# A background process that counts, a file, and a Python variable: the three kinds of state that must
# survive a hibernation.
COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/c.new; mv /tmp/c.new /tmp/counter; sleep 0.2; done"
SETUP = f"nohup sh -c '{COUNTER}' >/dev/null 2>&1 &"


def _give_state(sb: Sandbox) -> None:
    assert sb.commands.run(["sh", "-c", SETUP]).exit_code == 0
    sb.files.write("/root/notes.txt", b"remember me\n")
    sb.run_code("import numpy as np\nsecret = np.arange(10) * 7")
    assert wait_until(lambda: sb.files.exists("/tmp/counter"), 10)


def _check_state(sb: Sandbox) -> None:
    assert sb.files.read("/root/notes.txt") == b"remember me\n"
    assert sb.run_code("int(secret.sum())").result == "315"
    first = int(sb.files.read("/tmp/counter"))
    assert wait_until(lambda: int(sb.files.read("/tmp/counter")) > first, 10), "the counter stopped"


def _vmm_of(state_dir: Path, sandbox_id: str) -> set[int]:
    return qemu_pids(state_dir / "sandboxes" / sandbox_id)


@pytest.fixture
def sb(daemon_url: str) -> Iterator[Sandbox]:
    with Sandbox.create("python-ds", url=daemon_url) as sandbox:
        yield sandbox


def test_hibernate_and_wake_keep_memory_processes_and_files(sb: Sandbox, daemon_state: Path) -> None:
    _give_state(sb)
    assert _vmm_of(daemon_state, sb.id)
    info = sb.hibernate()
    assert info.state == "hibernated"
    assert not _vmm_of(daemon_state, sb.id), "a hibernated sandbox holds no VMM process"
    # On disk it costs what it changed, not the guest's RAM (512 MiB) and not the template's pages.
    assert info.disk_bytes is not None and 0 < info.disk_bytes < 200 * 2**20
    assert sb.refresh().state == "hibernated"
    time.sleep(3)  # time passing while it sleeps is the condition under test: its clock must catch up
    assert sb.wake().state == "running"
    _check_state(sb)
    guest_time = float(sb.commands.run("date +%s.%N").stdout)
    assert abs(guest_time - time.time()) < 1.0


def test_any_call_wakes_a_hibernated_sandbox(sb: Sandbox) -> None:
    _give_state(sb)
    sb.hibernate()
    assert sb.commands.run("cat /root/notes.txt").stdout == "remember me\n"  # woke transparently
    assert sb.refresh().state == "running"
    sb.hibernate()
    _check_state(sb)  # files, then run_code, each wakes or finds it awake


def test_hibernate_twice_and_bad_calls(sb: Sandbox, daemon_url: str) -> None:
    sb.hibernate()
    assert sb.hibernate().state == "hibernated"  # idempotent
    with Client(daemon_url) as client, pytest.raises(NotFound):
        client.request("POST", "/v1/sandboxes/sb-000000000000/hibernate")
    sb.wake()
    assert sb.wake().state == "running"


def test_idle_sandbox_hibernates_by_itself(daemon_url: str, daemon_state: Path) -> None:
    with Sandbox.create("python-ds", url=daemon_url, idle_timeout=1) as sb:
        sb.run_code("x = 41")
        assert wait_until(lambda: sb.refresh().state == "hibernated", 30)
        assert not _vmm_of(daemon_state, sb.id)
        assert sb.run_code("x + 1").result == "42"


def test_checkpoint_and_fork(sb: Sandbox, daemon_url: str) -> None:
    _give_state(sb)
    checkpoint = sb.snapshot()
    assert checkpoint.sandbox_id == sb.id and checkpoint.disk_bytes > 0
    sb.run_code("secret = None")  # the source runs on and changes; the checkpoint does not
    with Sandbox.create(from_snapshot=checkpoint.id, url=daemon_url) as copy:
        assert copy.id != sb.id
        _check_state(copy)
        hostname = copy.commands.run("hostname").stdout.strip()
        assert hostname == copy.id
        copy.files.write("/root/notes.txt", b"changed in the copy\n")
    assert sb.files.read("/root/notes.txt") == b"remember me\n"
    forks = sb.fork(2)
    try:
        a, b = forks
        assert len({a.id, b.id, sb.id}) == 3
        assert a.run_code("secret is None").result == "True"
        rand = [s.run_code("import os; os.urandom(16).hex()").result for s in (a, b)]
        assert rand[0] != rand[1]
        a.files.write("/root/only-a", b"a")
        assert not b.files.exists("/root/only-a")
    finally:
        for f in forks:
            f.kill()
    with Client(daemon_url) as client:
        ids = [c["id"] for c in client.request("GET", "/v1/checkpoints").json()["checkpoints"]]
        assert checkpoint.id in ids
        client.request("DELETE", f"/v1/checkpoints/{checkpoint.id}")
        with pytest.raises(NotFound):
            client.request("GET", f"/v1/checkpoints/{checkpoint.id}")


def test_expired_checkpoints_are_collected(sb: Sandbox, daemon_url: str) -> None:
    checkpoint = sb.snapshot(ttl=0.5)
    time.sleep(1.0)  # the checkpoint's time to live passing is the condition under test
    with Client(daemon_url) as client:
        removed = client.request("POST", "/v1/gc").json()
        assert checkpoint.id in removed["checkpoints"]
        with pytest.raises(NotFound):
            client.request("GET", f"/v1/checkpoints/{checkpoint.id}")


def test_hibernate_refuses_a_busy_sandbox(sb: Sandbox, daemon_url: str) -> None:
    import threading

    started = threading.Event()

    def long_command() -> None:
        started.set()
        sb.commands.run("sleep 3")

    thread = threading.Thread(target=long_command)
    thread.start()
    started.wait()
    assert wait_until(lambda: _busy(sb), 10)
    with pytest.raises(Conflict):
        sb.hibernate()
    thread.join()
    assert sb.hibernate().state == "hibernated"


def _busy(sb: Sandbox) -> bool:
    out = sb.commands.run("pgrep -x sleep")
    return out.exit_code == 0
