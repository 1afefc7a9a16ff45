"""A daemon that dies leaves namespaces, uplinks and cgroups; the next one's reaping removes them all."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest

from tartarus.limits.spec import resolve_limits
from tartarus.network.sandbox import NicKind
from tartarus.sandbox.reap import reap_leftovers
from tartarus.sandbox.sandbox import Sandbox
from tartarus.snapshots.snapshot import find_snapshot
from tartarus.templates.built import get_template
from tests.network.conftest import leftovers, uplinks

pytestmark = pytest.mark.vm


def test_reaping_removes_a_dead_daemons_network_and_cgroups(tmp_path: Path) -> None:
    template = get_template("python-ds")
    snapshot = find_snapshot(template)
    assert snapshot is not None
    limits = resolve_limits(template_vcpus=template.vcpus, template_memory_mib=template.memory_mib)
    before = uplinks()

    # A "daemon" whose event loop runs in a thread: it creates a sandbox and then never tears it
    # down, like a daemon killed with SIGKILL (its VMM lives on until the reaper kills it).
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        restore = Sandbox.restore(snapshot, template, tmp_path, limits=limits)
        future = asyncio.run_coroutine_threadsafe(restore, loop)
        sandbox = future.result(120)
        assert sandbox.vm is not None and sandbox.vm.pid is not None
        pid = sandbox.vm.pid
        assert "netns" in leftovers(sandbox.id)
        assert uplinks() - before
        assert reap_leftovers(tmp_path) == [sandbox.id]
        assert not Path(f"/proc/{pid}/cmdline").exists() or not Path(f"/proc/{pid}/cmdline").read_bytes()
        assert leftovers(sandbox.id) == []
        assert uplinks() - before == set()
        assert not (tmp_path / sandbox.id).exists()
        # The "dead daemon" may now notice its VMM is gone; its own teardown finds nothing left.
        asyncio.run_coroutine_threadsafe(sandbox.destroy(), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.mark.parametrize("nic", ["tap", "veth"])
def test_namespaces_whose_directory_vanished_are_removed_host_wide(tmp_path: Path, nic: NicKind) -> None:
    """A state dir deleted under a crashed daemon (or a test's temporary dir) leaves its namespaces with
    nothing pointing at them; any daemon's start or `gc` removes them, and only them: a gVisor
    sandbox's NIC namespace (`veth`) with its own."""
    from tartarus.limits import SandboxCgroup
    from tartarus.network import SandboxNetwork
    from tartarus.network.sandbox import reap_orphans

    gone, kept = tmp_path / "gone" / "sb-orphan00001", tmp_path / "kept" / "sb-orphan00002"
    for workdir in (gone, kept):
        workdir.mkdir(parents=True)
    limits = resolve_limits(template_vcpus=1, template_memory_mib=256)
    orphan = SandboxNetwork.create(gone, gone.name, nic=nic)
    SandboxCgroup.create(gone.name, limits)
    live = SandboxNetwork.create(kept, kept.name, nic=nic)
    try:
        assert orphan.nft is not None
        orphan.nft.close()  # the daemon that held it is gone
        shutil.rmtree(gone.parent)
        assert "netns" in leftovers(gone.name)
        assert orphan.netns in reap_orphans()  # (with any other host-wide orphan)
        assert leftovers(gone.name) == []
        assert orphan.host_link not in uplinks() and live.host_link in uplinks()
        assert "netns" in leftovers(kept.name)
        assert live.netns not in reap_orphans()
    finally:
        live.destroy()
    assert live.host_link not in uplinks()
