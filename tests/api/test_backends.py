"""The sandbox features that both backends serve, through the real API on each: a VM (the host's: kvm or
tcg) and gVisor (runsc restoring the template's warm image). One sandbox per backend carries the feature
checks, so the module costs two creates per backend, not a suite; the gVisor-only checks (what it
cannot see of the host, what it refuses) follow; its egress and quarantine are
tests/network/test_gvisor_egress_api.py's, its takeover after a daemon's kill -9 (or its reaping, network
and cgroups included) tests/gvisor/test_takeover.py's."""

from __future__ import annotations

import os
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tartarus.daemon.app import create_app
from tartarus.daemon.config import DaemonConfig
from tartarus.errors import BackendUnavailable, InvalidArgument, PolicyDenied
from tartarus.gvisor.container import pids_under
from tartarus.gvisor.runsc import Support
from tartarus.policy.model import Match, Policy, Rule
from tartarus.sandbox import choice
from tartarus.sdk import Sandbox
from tests.api.conftest import Api, tcp_daemon
from tests.conftest import wait_until
from tests.gvisor.helpers import require_gvisor

pytestmark = pytest.mark.vm

DEADLINE = 60.0
NO_GVISOR = Rule(
    name="vm-only-tenants", match=Match(tenant=["vm-only-*"], backend=["gvisor"]), verdict="reject",
    reason="this tenant's sandboxes run in VMs",
)  # fmt: skip


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One daemon (SQLite), with a policy that keeps the `vm-only-*` tenants off gVisor."""
    state = tmp_path_factory.mktemp("api-backends")
    app = create_app(state, DaemonConfig(pool_size=0, policy=Policy(rules=[NO_GVISOR])))
    with tcp_daemon(state, None, app) as url:
        yield Api(url, state, (state / "admin.key").read_text().strip(), "sqlite")


@pytest.fixture(scope="module")
def alice(api: Api) -> str:
    return api.new_key("alice")


def backend_of(param: str) -> str:
    if param == "gvisor":
        require_gvisor()
        return "gvisor"
    return choice.vm_backend()


@pytest.mark.parametrize("param", ["vm", "gvisor"])
def test_the_sandbox_features_on_each_backend(api: Api, alice: str, param: str) -> None:
    backend = backend_of(param)
    sb = Sandbox.create("python-ds", url=api.url, api_key=alice, env={"GREETING": "hi"}, backend=backend)
    workdir = api.state / "sandboxes" / sb.id
    try:
        assert sb.info.backend == backend and sb.info.restored  # from the snapshot / the warm image
        assert workdir.is_dir()
        listed = {s.id: s for s in Sandbox.list(url=api.url, api_key=alice)}
        assert listed[sb.id].backend == backend
        # run_code keeps its state between calls and sees the create's env.
        sb.run_code("import numpy as np\nx = np.arange(10).sum()")
        assert sb.run_code("int(x) + 1").result == "46"
        assert sb.run_code("import os; os.environ['GREETING']").result == "'hi'"
        # exec: streamed output on both streams, stdin, the exit code, a signal, a timeout.
        out: list[bytes] = []
        done = sb.commands.run(
            "cat; echo to-err >&2; echo $GREETING; exit 3", stdin=b"from-stdin\n", on_stdout=out.append
        )
        assert (done.exit_code, done.stdout, done.stderr) == (3, "from-stdin\nhi\n", "to-err\n")
        assert b"".join(out).decode() == done.stdout
        killed = sb.commands.run("kill -TERM $$")
        assert killed.signal in (signal.SIGTERM, "SIGTERM", "TERM") or killed.exit_code == 128 + 15
        slow = sb.commands.run("sleep 30", timeout=1)
        assert slow.timed_out
        # Files: written, read, listed, removed.
        sb.files.make_dir("/root/data")
        sb.files.write("/root/data/note.txt", b"kept\n")
        assert sb.files.read("/root/data/note.txt") == b"kept\n"
        assert [e.name for e in sb.files.list("/root/data").entries] == ["note.txt"]
        sb.files.remove("/root/data", recursive=True)
        assert not sb.files.exists("/root/data")
        # Usage: a VM's from its VMM process and guest kernel, a gVisor sandbox's from its cgroup too.
        sb.run_code("_held = bytearray(96 << 20)")
        used = sb.metrics()
        assert used.cpu_count == 1 and 0 < used.cpu_used_pct <= 100
        assert 96 << 20 < used.mem_used_bytes < used.mem_total_bytes <= 512 << 20
        assert 0 < used.disk_used_bytes < used.disk_total_bytes
    finally:
        sb.kill()
    assert not workdir.exists()  # the writable layer and everything else went with it


def test_a_terminal_in_a_gvisor_sandbox(api: Api, alice: str) -> None:
    require_gvisor()
    with Sandbox.create("python-ds", url=api.url, api_key=alice, backend="gvisor") as sb:
        seen = bytearray()
        with sb.pty.create(rows=30, cols=100) as pty:
            pty.send(b"stty size; echo $((6*7))\n")
            while re.search(rb"30 100\r\n42\r\n", seen) is None:
                chunk = pty.recv(timeout=DEADLINE)
                assert chunk, f"the shell exited; output: {bytes(seen)!r}"
                seen += chunk


def test_gvisor_sandbox_code_sees_neither_the_hosts_files_nor_its_processes(
    api: Api, alice: str, tmp_path: Path
) -> None:
    require_gvisor()
    secret = tmp_path / "host-secret.txt"
    secret.write_text("the host's\n")
    with Sandbox.create("python-ds", url=api.url, api_key=alice, backend="gvisor") as sb:
        assert sb.commands.run(f"cat {secret}").exit_code != 0
        assert sb.commands.run(f"test -e {tmp_path}").exit_code != 0
        assert sb.commands.run("hostname").stdout.strip() != socket.gethostname()
        # Its process table is its own: a handful of pids, none of them this test's process.
        pids = [int(p) for p in sb.commands.run("ls /proc").stdout.split() if p.isdigit()]
        assert 0 < len(pids) < 20, pids
        mine = sb.commands.run(f"cat /proc/{os.getpid()}/cmdline").stdout
        assert "pytest" not in mine
        names = sb.commands.run("cat /proc/[0-9]*/comm").stdout.split()
        assert "pytest" not in names and "runsc" not in names and "runsc-sandbox" not in names


def test_what_gvisor_sandboxes_cannot_do_yet_is_refused_by_name(
    api: Api, alice: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_gvisor()
    with pytest.raises(InvalidArgument, match="gvisor backend does not enforce disk_mib"):
        Sandbox.create("python-ds", url=api.url, api_key=alice, backend="gvisor", disk_mib=8192)
    with pytest.raises(PolicyDenied, match="VMs"):
        Sandbox.create("python-ds", url=api.url, api_key=api.new_key("vm-only-bob"), backend="gvisor")
    with pytest.raises(InvalidArgument):
        Sandbox.create("python-ds", url=api.url, api_key=alice, backend="firecracker")
    monkeypatch.setattr(choice, "gvisor_support", lambda: Support(False, "runsc is not installed"))
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {alice}"}) as c:
        answer = c.post("/v1/sandboxes", json={"template": "python-ds", "backend": "gvisor"})
    assert answer.status_code == 503 and "runsc is not installed" in answer.text
    assert answer.json()["error"]["code"] == BackendUnavailable.code


def test_a_gvisor_sandbox_whose_runsc_dies_is_failed_with_why(api: Api, alice: str) -> None:
    require_gvisor()
    sb = Sandbox.create("python-ds", url=api.url, api_key=alice, backend="gvisor")
    workdir = api.state / "sandboxes" / sb.id
    try:
        for pid in pids_under(workdir / "gvisor" / "runsc"):
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: sb.refresh().state == "failed", DEADLINE)
        assert "gVisor sandbox exited" in (sb.info.error or "")
    finally:
        sb.kill()
    assert not workdir.exists()
