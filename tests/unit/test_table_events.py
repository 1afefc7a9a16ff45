"""The store follows the table of sandboxes as changes happen (no polling): each change the table tells
of is written, in order, and a sandbox's end carries why it ended (pure logic: no VM)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tartarus.daemon.control import ControlPlane
from tartarus.daemon.manager import SandboxManager
from tartarus.daemon.table import SandboxRecord
from tartarus.sandbox.spec import SandboxSpec
from tartarus.templates.built import Template


def test_the_store_follows_each_change_the_table_tells_of(tmp_path: Path) -> None:
    async def scenario() -> None:
        manager = SandboxManager(tmp_path)
        template = Template("python-ds", "k", Path("/nonexistent"), "ext4")
        spec = SandboxSpec("python-ds", tenant="acme", labels={"team": "ml"})
        record = SandboxRecord("sb-1", template, spec, None, "hibernated")
        manager.table.load(record)
        control = ControlPlane(tmp_path, manager)
        control.open()
        control.store.ensure_tenant("acme")
        control.start()
        try:
            await control.stored.insert([record])
            row = control.store.get_sandbox("sb-1")
            assert row is not None and (row.tenant, row.labels, row.state) == (
                "acme",
                {"team": "ml"},
                "hibernated",
            )

            record.state, record.error = "failed", "VM exited"
            manager.table.changed(record, "failed")
            await control.flush()
            row = control.store.get_sandbox("sb-1")
            assert row is not None and (row.state, row.error) == ("failed", "VM exited")

            manager.table.remove("sb-1")
            record.error = None
            manager.table.ended(record, "was destroyed: its timeout of 1 s expired", "expired")
            await control.flush()
            row = control.store.get_sandbox("sb-1")
            assert row is not None and row.state == "destroyed" and row.ended_at is not None
            assert row.error == "was destroyed: its timeout of 1 s expired"
            assert control.metrics.expired._value.get() == 1
            assert manager.why_ended("sb-1") == "was destroyed: its timeout of 1 s expired"
            names = {task.get_name() for task in asyncio.all_tasks()}
            assert not any("watch" in name for name in names), names  # nothing polls
        finally:
            await control.close()

    asyncio.run(scenario())
