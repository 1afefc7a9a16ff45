"""Streams against a real guest: its agent sends output only against credit, so a reader that stalls
holds at most a window in the daemon, and one that walks away leaves the sandbox answering."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tartarus.runtime.agent import AgentClient, Exit
from tartarus.runtime.flow import FRAME_COST, WINDOW
from tartarus.sandbox.sandbox import Sandbox
from tartarus.snapshots.build import ensure_snapshot
from tartarus.templates.built import Template
from tests.conftest import qemu_pids

pytestmark = pytest.mark.vm
DEADLINE = 120.0


async def _run(agent: AgentClient, script: str) -> str:
    process = await agent.exec(["sh", "-c", script])
    out = b""
    async for event in process.events():
        if not isinstance(event, Exit):
            out += event.data
    return out.decode()


async def _filled(agent: AgentClient, credit: int) -> None:
    """Wait until the guest has used `credit` (its output queued here, untaken): it stops once a frame
    would not fit, up to FRAME_COST short of it."""
    async with asyncio.timeout(DEADLINE):
        while agent.queued_bytes < credit - FRAME_COST:
            await asyncio.sleep(0.05)


def test_stalled_and_abandoned_streams_hold_a_window_and_leave_the_sandbox_answering(
    python_ds: Template, tmp_path: Path
) -> None:
    async def main() -> None:
        sb = await Sandbox.restore(ensure_snapshot(python_ds), python_ds, tmp_path)
        try:
            agent = sb.agent
            await _run(agent, "head -c 20000000 /dev/urandom > /tmp/big")
            # A file read whose reader stalls after the first chunk: the guest fills the window, stops.
            chunks = await agent.read_file("/tmp/big")
            first = await anext(chunks)  # taken, and less than a credit refill: not returned yet
            read_credit = WINDOW - len(first) - FRAME_COST
            await _filled(agent, read_credit)
            assert await agent.ping() >= 3  # the channel is free for other calls meanwhile...
            assert agent.queued_bytes <= read_credit  # ...and the guest sent nothing past its credit
            # A command whose output nobody reads: same, on top.
            spew = await agent.exec(["cat", "/tmp/big", "/tmp/big"])
            await _filled(agent, read_credit + WINDOW)
            assert await _run(agent, "echo still here") == "still here\n"
            assert agent.queued_bytes <= read_credit + WINDOW
            # Both walk away: the daemon frees their output at once, the guest closes the file and
            # drops the command's output (it runs to its end), and the sandbox goes on answering.
            await chunks.aclose()
            spew.abandon()
            assert agent.queued_bytes == 0
            async with asyncio.timeout(DEADLINE):
                while await _run(agent, "pgrep -x cat || true"):
                    await asyncio.sleep(0.2)
            open_fds = await _run(agent, "ls -l /proc/[0-9]*/fd 2>/dev/null | grep /tmp/big || true")
            assert open_fds == ""
            data = b""
            async for chunk in await agent.read_file("/tmp/big"):  # a reader that keeps up gets it all
                data += chunk
            assert len(data) == 20_000_000
            assert agent.queued_bytes == 0
        finally:
            await sb.destroy()

    asyncio.run(main())
    assert not qemu_pids(tmp_path)
