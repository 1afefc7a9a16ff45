"""The guest side of a network policy: names in /etc/hosts (`allow`), the DNS relay (`full`).

Under `allow` the guest gets no resolver (its DNS answers must never widen a policy), so the names a
policy allows are written next to the addresses the host resolved; under `full` its resolver is the
relay at its gateway. Convenience only: the guest may rewrite both files, and that changes nothing
about what the namespace's rules let out.
"""

from __future__ import annotations

from tartarus.errors import GuestError
from tartarus.runtime.agent import AgentClient

HOSTS = "/etc/hosts"
RESOLV = "/etc/resolv.conf"
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


async def use_relay(agent: AgentClient, gateway: str) -> None:
    await agent.write_file(RESOLV, f"nameserver {gateway}\n".encode())
