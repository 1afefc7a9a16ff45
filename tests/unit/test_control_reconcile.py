"""Reconciling the store with what the manager found at start, with a stand-in manager (pure logic)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from tartarus.daemon.control import ControlPlane, node_id
from tartarus.daemon.table import SandboxRecord, SandboxTable
from tartarus.sandbox.spec import SandboxSpec
from tartarus.store import SandboxRow, Store, default_url
from tartarus.templates.built import Template


class FoundAgain:
    """A manager that found one sandbox again after a restart (as hibernated ones are)."""

    pooled = 0

    def __init__(self, ids: list[str]) -> None:
        self.table = SandboxTable()
        template = Template("python-ds", "k", Path("/nonexistent"), "ext4")
        for i in ids:
            self.table.load(SandboxRecord(i, template, SandboxSpec("python-ds"), None, "hibernated"))

    def list(self) -> list[Any]:
        return self.table.list()


def test_restart_keeps_owners_of_found_sandboxes_and_marks_the_rest_lost(tmp_path: Path) -> None:
    node = node_id(tmp_path)
    store = Store.open(default_url(tmp_path))
    store.ensure_tenant("acme")
    for id_ in ("sb-kept", "sb-gone"):
        store.insert_sandbox(SandboxRow(id_, "acme", node, "python-ds", "running", 1, 512, time.time()))
    store.insert_sandbox(
        SandboxRow("sb-other-node", "acme", "elsewhere", "python-ds", "running", 1, 512, 0.0)
    )
    store.close()

    control = ControlPlane(tmp_path, FoundAgain(["sb-kept"]))  # type: ignore[arg-type]
    control.open()
    try:
        assert set(control.owners) == {"sb-kept"} and control.owners["sb-kept"].tenant == "acme"
        states = {r.id: r.state for r in control.store.list_sandboxes()}
        assert states == {"sb-kept": "running", "sb-gone": "lost", "sb-other-node": "running"}
        assert control.usage("acme").sandboxes == 1 and control.usage("acme").vcpus == 0  # no VM: no vCPUs
    finally:
        asyncio.run(control.close())
