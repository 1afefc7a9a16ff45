"""A daemon killed with -9 and started again: its records, keys and tenants are all there, the sandboxes
whose VMs died with it are marked lost, and nothing of them is left on the host."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tartarus.sdk import Sandbox
from tests.api.conftest import backend_url
from tests.conftest import qemu_pids, wait_until

pytestmark = pytest.mark.vm

TARTARUS = Path(sys.executable).parent / "tartarus"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url_or_none(request: pytest.FixtureRequest) -> str | None:
    return backend_url(request)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(self, state: Path, database_url: str | None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "TARTARUS_STATE_DIR": str(state), "TARTARUS_POOL_SIZE": "0"}
        env.pop("TARTARUS_DATABASE_URL", None)
        if database_url:
            env["TARTARUS_DATABASE_URL"] = database_url
        self.log = (state.parent / f"daemon-{self.port}.log").open("w")
        self.proc = subprocess.Popen(
            [str(TARTARUS), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        assert wait_until(self._up, timeout=60), "daemon did not come up"

    def _up(self) -> bool:
        assert self.proc.poll() is None, "daemon exited"
        try:
            return httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)
        self.log.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop(signal.SIGKILL)


def test_kill_9_then_restart_keeps_every_record(
    tmp_path: Path, database_url_or_none: str | None, daemons: list[Daemon]
) -> None:
    state = tmp_path / "state"
    first = Daemon(state, database_url_or_none)
    daemons.append(first)
    admin_key = (state / "admin.key").read_text().strip()
    with httpx.Client(base_url=first.url, headers={"Authorization": f"Bearer {admin_key}"}) as c:
        tenant_key = c.post("/v1/keys", json={"tenant": "survivor"}).json()["key"]
        c.put("/v1/tenants/survivor/quota", json={"max_sandboxes": 5}).raise_for_status()
    running = Sandbox.create("python-ds", url=first.url, api_key=tenant_key, labels={"keep": "me"})
    gone = Sandbox.create("python-ds", url=first.url, api_key=tenant_key)
    gone.kill()
    vm_dir = state / "sandboxes" / running.id
    assert qemu_pids(vm_dir)

    first.stop(signal.SIGKILL)
    # The VMM dies with its daemon (parent-death signal), never outliving it.
    assert wait_until(lambda: not qemu_pids(vm_dir), timeout=30)

    second = Daemon(state, database_url_or_none)
    daemons.append(second)
    assert (state / "admin.key").read_text().strip() == admin_key  # the local key still works
    ended = {s["id"]: s for s in Sandbox.list(url=second.url, api_key=tenant_key, include_ended=True)}
    assert ended[running.id]["state"] == "lost" and "previous daemon" in ended[running.id]["error"]
    assert ended[running.id]["labels"] == {"keep": "me"}
    assert ended[gone.id]["state"] == "destroyed"
    assert Sandbox.list(url=second.url, api_key=tenant_key) == []  # nothing claims to run
    assert not vm_dir.exists()
    with httpx.Client(base_url=second.url, headers={"Authorization": f"Bearer {admin_key}"}) as c:
        assert c.get("/v1/tenants/survivor").json()["quota"]["max_sandboxes"] == 5
        actions = [e["action"] for e in c.get("/v1/audit", params={"limit": 50}).json()["entries"]]
    assert "POST /v1/sandboxes" in actions and "DELETE /v1/sandboxes/{sandbox_id}" in actions
    assert "sandbox.lost" in actions
    # And it serves new sandboxes for the same tenant.
    with Sandbox.create("python-ds", url=second.url, api_key=tenant_key) as sb:
        assert sb.commands.run("echo back").stdout == "back\n"
    second.stop(signal.SIGTERM)
    assert second.proc.returncode is not None
