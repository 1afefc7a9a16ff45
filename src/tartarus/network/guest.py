"""The guest side of an `allow` policy with DNS names: the pinned addresses in the guest's /etc/hosts.

The guest gets no resolver (its DNS answers must never widen a policy), so the names a policy allows
are written next to the addresses the host resolved. Convenience only: the guest may rewrite the
file, and it changes nothing about what the namespace's rules let out.
"""

from __future__ import annotations

from tartarus.errors import GuestError
from tartarus.runtime.agent import AgentClient

HOSTS = "/etc/hosts"
MAX_HOSTS_BYTES = 1 << 20


async def pin_names(agent: AgentClient, hosts: tuple[tuple[str, str], ...]) -> None:
    current = b""
    try:
        async for chunk in await agent.read_file(HOSTS):
            current += chunk
            if len(current) > MAX_HOSTS_BYTES:
                current = b""
                break
    except GuestError:
        pass  # no /etc/hosts yet: ours is the whole file
    if current and not current.endswith(b"\n"):
        current += b"\n"
    lines = "".join(f"{address} {name}\n" for name, address in hosts)
    await agent.write_file(HOSTS, current + b"# pinned by the sandbox's network policy\n" + lines.encode())
