"""The guest-side process cap: kernel.threads-max, written through the agent.

It applies to root too (unlike RLIMIT_NPROC), so a fork bomb inside the guest meets EAGAIN instead of
exhausting guest memory. It is not a security boundary: guest code running as root can raise it again.
What protects the host and the neighbours is the VMM's cgroup, whatever the guest does.
"""

from __future__ import annotations

from tartarus.errors import SandboxFailed
from tartarus.runtime.agent import AgentClient

MIN_THREADS = 20  # the kernel refuses less


async def set_max_processes(agent: AgentClient, n: int) -> None:
    n = max(MIN_THREADS, n)
    process = await agent.exec(["/bin/sh", "-c", f"echo {n} > /proc/sys/kernel/threads-max"])
    async for _ in process.events():
        pass
    if process.exit is None or process.exit.exit_code != 0:
        raise SandboxFailed(f"could not set the guest's process limit to {n}: {process.exit}")
