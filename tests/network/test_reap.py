"""A daemon that dies leaves namespaces, uplinks and cgroups; the next one's reaping removes them all."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from tartarus.limits.spec import resolve_limits
from tartarus.runtime.sandbox import SandboxOptions, reap_leftovers
from tartarus.snapshots.restore import restore
from tartarus.snapshots.store import find_snapshot
from tartarus.templates.store import get_template
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
        options = SandboxOptions(limits=limits)
        future = asyncio.run_coroutine_threadsafe(restore(snapshot, template, tmp_path, options), loop)
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
