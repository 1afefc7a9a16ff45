"""What the gVisor tests share: the skip where runsc cannot run, host traces, command output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tartarus.gvisor.runsc import probe
from tartarus.runtime.agent import AgentClient, Exit, Output

DEADLINE = 60.0  # generous: the machine is shared; every wait ends as soon as its condition holds


def require_gvisor() -> None:
    support = probe()
    if not support.works:
        pytest.skip(f"gVisor cannot run a container on this host: {support.reason}")


def host_traces(workdir: Path) -> list[str]:
    """What a container of `workdir` could leave: processes naming it, mounts below it, the directory."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(workdir).encode() in cmdline:
            found.append(f"process {pid}: {cmdline.split(bytes(1))[:3]!r}")
    found += [
        f"mount {line}" for line in Path("/proc/self/mounts").read_text().splitlines() if str(workdir) in line
    ]
    if workdir.exists():
        found.append(f"directory {workdir}")
    return found


async def output_of(agent: AgentClient, argv: list[str]) -> tuple[str, str, Exit]:
    process = await agent.exec(argv, timeout=DEADLINE)
    out, err = bytearray(), bytearray()
    async for event in process.events():
        if isinstance(event, Output):
            (out if event.stream == "stdout" else err).extend(event.data)
        else:
            return out.decode(), err.decode(), event
    raise AssertionError("the command's events ended without an exit")
