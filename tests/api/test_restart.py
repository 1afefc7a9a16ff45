"""A daemon killed with -9 and started again: its records, keys and tenants are all there, it takes over
the sandboxes still running (memory, files and processes intact), and those whose VM died meanwhile are
marked lost with nothing of them left on the host."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tartarus.sdk import Sandbox
from tests.api.conftest import backend_url
from tests.conftest import qemu_pids, wait_until
from tests.served import Served

pytestmark = pytest.mark.vm


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url_or_none(request: pytest.FixtureRequest) -> str | None:
    return backend_url(request)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for d in started:
        d.stop(signal.SIGKILL)


def test_kill_9_then_restart_takes_over_running_sandboxes(
    tmp_path: Path, database_url_or_none: str | None, daemons: list[Served]
) -> None:
    state = tmp_path / "state"
    first = Served(state, database_url=database_url_or_none)
    daemons.append(first)
    admin_key = (state / "admin.key").read_text().strip()
    with httpx.Client(base_url=first.url, headers={"Authorization": f"Bearer {admin_key}"}) as c:
        tenant_key = c.post("/v1/keys", json={"tenant": "survivor"}).json()["key"]
        c.put("/v1/tenants/survivor/quota", json={"max_sandboxes": 5}).raise_for_status()
    running = Sandbox.create("python-ds", url=first.url, api_key=tenant_key, labels={"keep": "me"})
    doomed = Sandbox.create("python-ds", url=first.url, api_key=tenant_key)
    gone = Sandbox.create("python-ds", url=first.url, api_key=tenant_key)
    gone.kill()
    # State of every kind the guest has: a Python variable, a file, a process.
    running.run_code("survivor = 6 * 7")
    running.files.write("/root/note.txt", b"written before the crash")
    running.commands.run("setsid sleep 1000 >/dev/null 2>&1 < /dev/null &")
    sleeper = running.commands.run("pgrep -x sleep").stdout.split()
    assert sleeper
    # A command in flight when the daemon dies dies with its caller's request (as when a client goes).
    in_flight = threading.Thread(target=_run_ignoring_errors, args=(running, "sleep 777"), daemon=True)
    in_flight.start()
    assert wait_until(lambda: "777" in running.commands.run("pgrep -a sleep").stdout, timeout=10)
    # A guest port exposed on the host: clients hold its address across the restart.
    running.commands.run("setsid python3 -m http.server 8000 --directory /root >/dev/null 2>&1 < /dev/null &")
    address = running.get_host(8000)
    assert _fetch(address, "/note.txt") == b"written before the crash"
    vm_dir = state / "sandboxes"
    vmms = qemu_pids(vm_dir)
    assert len(vmms) == 2

    first.stop(signal.SIGKILL)
    # The VMMs outlive their daemon; one of them dies while no daemon runs.
    assert qemu_pids(vm_dir) == vmms
    doomed_dir = _workdir_of(state, doomed.id)
    assert doomed_dir is not None
    doomed_pid = next(iter(qemu_pids(doomed_dir)))
    os.kill(doomed_pid, signal.SIGKILL)
    assert wait_until(lambda: len(qemu_pids(vm_dir)) == 1, timeout=10)

    second = Served(state, database_url=database_url_or_none)
    daemons.append(second)
    assert (state / "admin.key").read_text().strip() == admin_key  # the local key still works
    listed = {s.id: s for s in Sandbox.list(url=second.url, api_key=tenant_key, include_ended=True)}
    assert listed[running.id].state == "running" and listed[running.id].labels == {"keep": "me"}
    assert listed[doomed.id].state == "lost" and "previous daemon" in (listed[doomed.id].error or "")
    assert listed[gone.id].state == "destroyed"
    # The same VM, taken over: its memory, files and processes are all there.
    again = Sandbox.connect(running.id, url=second.url, api_key=tenant_key)
    assert again.run_code("survivor").result == "42"
    assert again.files.read("/root/note.txt") == b"written before the crash"
    assert again.commands.run("pgrep -x sleep").stdout.split() == sleeper  # not `sleep 777`
    assert again.commands.run("echo back").stdout == "back\n"
    assert _fetch(address, "/note.txt") == b"written before the crash"  # the same address again
    assert again.get_host(8000) == address
    assert qemu_pids(vm_dir) == vmms - {doomed_pid}
    assert not _workdir_of(state, doomed.id, missing_ok=True)  # reaped with its network and cgroup
    with httpx.Client(base_url=second.url, headers={"Authorization": f"Bearer {admin_key}"}) as c:
        assert c.get("/v1/tenants/survivor").json()["quota"]["max_sandboxes"] == 5
        actions = [e["action"] for e in c.get("/v1/audit", params={"limit": 50}).json()["entries"]]
    assert "POST /v1/sandboxes" in actions and "DELETE /v1/sandboxes/{sandbox_id}" in actions
    assert "sandbox.lost" in actions
    # It is managed like any other: it can hibernate, wake and be destroyed, and new ones are served.
    # A connection to its exposed address wakes it, as any call does.
    assert again.hibernate().state == "hibernated"
    assert _fetch(address, "/note.txt") == b"written before the crash"
    assert again.refresh().state == "running"
    assert again.run_code("survivor").result == "42"
    with Sandbox.create("python-ds", url=second.url, api_key=tenant_key) as sb:
        assert sb.commands.run("echo new").stdout == "new\n"
    again.kill()
    second.stop(signal.SIGTERM)
    assert second.proc.returncode is not None
    assert not qemu_pids(vm_dir)  # a graceful stop ends what it runs


def test_clean_stop_with_keep_sandboxes_hands_them_to_the_next_daemon(
    tmp_path: Path, database_url_or_none: str | None, daemons: list[Served]
) -> None:
    state = tmp_path / "state"
    first = Served(state, "--keep-sandboxes", database_url=database_url_or_none)
    daemons.append(first)
    key = (state / "admin.key").read_text().strip()
    sb = Sandbox.create("python-ds", url=first.url, api_key=key)
    sb.run_code("kept = [1, 2, 3]")
    # And a hibernated one with an exposed port: the next daemon listens on it again.
    sleeper = Sandbox.create("python-ds", url=first.url, api_key=key)
    sleeper.files.write("/root/hello.txt", b"hello")
    sleeper.commands.run("setsid python3 -m http.server 8000 --directory /root >/dev/null 2>&1 < /dev/null &")
    address = sleeper.get_host(8000)
    assert _fetch(address, "/hello.txt") == b"hello"
    sleeper.hibernate()
    vmms = qemu_pids(state / "sandboxes")
    first.stop(signal.SIGTERM)
    assert first.proc.returncode is not None
    assert qemu_pids(state / "sandboxes") & vmms  # the sandbox's VMM (pooled ones are not kept)

    second = Served(state, database_url=database_url_or_none)
    daemons.append(second)
    states = {info.id: info.state for info in Sandbox.list(url=second.url, api_key=key)}
    assert states == {sb.id: "running", sleeper.id: "hibernated"}
    again = Sandbox.connect(sb.id, url=second.url, api_key=key)
    assert again.run_code("kept").result == "[1, 2, 3]"
    assert _fetch(address, "/hello.txt") == b"hello"  # woken by the connection
    second.stop(signal.SIGTERM)  # without the flag: its sandboxes end with it
    assert not qemu_pids(state / "sandboxes")


def _fetch(address: str, path: str, timeout: float = 30) -> bytes:
    """GET from a guest's server through its exposed address (it may still be starting under TCG)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(f"http://{address}{path}", timeout=5).raise_for_status().content
        except httpx.HTTPError:
            assert time.monotonic() < deadline, f"nothing answered on {address}"
            time.sleep(0.2)


def _run_ignoring_errors(sb: Sandbox, command: str) -> None:
    with contextlib.suppress(Exception):
        sb.commands.run(command, timeout=600)


def _workdir_of(state: Path, sandbox_id: str, *, missing_ok: bool = False) -> Path | None:
    """The working directory of a sandbox (a pooled VMM's keeps its own name), by its descriptor."""
    for workdir in (state / "sandboxes").iterdir():
        desc = workdir / "sandbox.json"
        if desc.exists() and json.loads(desc.read_text())["id"] == sandbox_id:
            return workdir
    assert missing_ok, f"no working directory for {sandbox_id}"
    return None
