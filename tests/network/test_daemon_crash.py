"""A served daemon killed with SIGKILL leaves its VMMs running with their namespaces, uplinks and cgroups;
the next daemon takes over the sandboxes still alive, as they were (quarantine included), and removes the
rest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tartarus.paths import LOCAL_KEY_FILE
from tartarus.sdk import Sandbox
from tests.conftest import qemu_pids
from tests.network.conftest import HOST_ADDR, NetHost, leftovers, probe, uplinks, wait_for
from tests.network.test_quarantine import cpu_quota_us

pytestmark = pytest.mark.vm


def _serve(state: Path, sock: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TARTARUS_STATE_DIR": str(state), "TARTARUS_POOL_SIZE": "1"}
    argv = [sys.executable, "-m", "tartarus.cli.main", "serve", "--socket", str(sock)]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: sock.exists() or process.poll() is not None, 60), "daemon did not start"
    assert process.poll() is None, "daemon exited"
    return process


def _workdirs(state: Path) -> dict[str, str]:
    """Sandbox id -> its working directory's name (which names its namespace and cgroup: a pooled
    VMM's directory keeps the pool's name), from the descriptors a served daemon writes."""
    found = {}
    for workdir in (state / "sandboxes").iterdir():
        desc = workdir / "sandbox.json"
        if desc.exists():
            found[json.loads(desc.read_text())["id"]] = workdir.name
    return found


def test_next_daemon_takes_over_live_sandboxes_and_reaps_the_rest(tmp_path: Path, net_host: NetHost) -> None:
    state, sock = tmp_path / "state", tmp_path / "api.sock"
    before = uplinks()
    port = net_host.ports[0]
    daemon = _serve(state, sock)
    try:
        key = (state / LOCAL_KEY_FILE).read_text().strip()  # the socket is not beside the state dir
        url = f"unix://{sock}"
        policy = {"mode": "allow", "allow": [{"host": HOST_ADDR, "ports": [port]}]}
        kept = Sandbox.create("python-ds", url=url, api_key=key, network=policy, timeout=600)
        dead = Sandbox.create("python-ds", url=url, api_key=key, network="full", timeout=600)
        assert probe(kept, [(HOST_ADDR, port)]) == {(HOST_ADDR, port): "open"}
        kept.quarantine("test: confined before the crash")
        names = _workdirs(state)
        # Two sandboxes and at least one pooled VMM (one per template with a snapshot: python-ds, base).
        assert wait_for(lambda: len(list((state / "sandboxes").glob("*/qemu.pid"))) >= 3, 60), "no pooled VMM"
        pooled = [p.name for p in (state / "sandboxes").iterdir() if p.name not in names.values()]
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    # The VMMs outlive their daemon (pooled ones too); one dies while no daemon runs.
    assert all(qemu_pids(state / "sandboxes" / name) for name in [*names.values(), *pooled])
    for pid in qemu_pids(state / "sandboxes" / names[dead.id]):
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not qemu_pids(state / "sandboxes" / names[dead.id]), 10)
    sock.unlink(missing_ok=True)
    daemon = _serve(state, sock)
    try:
        # Reaping happens before the socket is served: what no sandbox can use any more is gone.
        for name in [names[dead.id], *pooled]:
            assert leftovers(name) == [], name
            assert not qemu_pids(state / "sandboxes" / name)
        # The survivor is taken over still quarantined: its gate stays shut until an operator opens it.
        assert "netns" in leftovers(names[kept.id])
        again = Sandbox.connect(kept.id, url=url, api_key=key)
        assert again.info.quarantined and again.info.network == "none"
        assert probe(again, [(HOST_ADDR, port)]) == {(HOST_ADDR, port): "TimeoutError"}
        assert cpu_quota_us(names[kept.id]) == 10_000
        info = again.release()
        assert not info.quarantined and info.network == "allow"
        assert probe(again, [(HOST_ADDR, port)]) == {(HOST_ADDR, port): "open"}
        assert cpu_quota_us(names[kept.id]) == 100_000
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    deadline = time.monotonic() + 10
    while uplinks() - before and time.monotonic() < deadline:
        time.sleep(0.05)  # the last daemon's sandboxes and pool are torn down on SIGTERM
    assert uplinks() - before == set()
    assert leftovers(names[kept.id]) == []
    assert not qemu_pids(state)
