"""The daemon's exposed guest ports, per sandbox: listeners that last as long as the sandbox does.

They belong to the daemon, not to a sandbox's network, because a sandbox's network and VMM come and go
(hibernation) while the addresses its clients hold should not: a connection to a hibernated sandbox's
port wakes it (unless the port is protected and the connection has no token). The guest port -> host
port map, with the token of protected ports, is written down (descriptor, hibernation record) so a
restarted daemon listens again on the same host ports with the same protection.

Every listener and every connection costs the daemon file descriptors, so both are bounded (`Rules`,
from the policy): ports per sandbox and per tenant (429 quota_exceeded past them), connections in
progress per sandbox and per tenant (one past them is closed at once).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tartarus.errors import QuotaExceeded
from tartarus.network.expose import PortForward
from tartarus.network.sandbox import GUEST_ADDR
from tartarus.network.traffic import mint_token

log = logging.getLogger(__name__)

GUEST_IP = GUEST_ADDR.split("/")[0]


@dataclass(frozen=True)
class Rules:
    """The policy's `network` rules for exposed ports."""

    require_token: bool = False  # every port is protected, whatever the request says
    ports_per_sandbox: int = 16
    ports_per_tenant: int = 64
    connections_per_sandbox: int = 64
    connections_per_tenant: int = 256


@dataclass(frozen=True)
class Exposure:
    """One exposed port as a client sees it (and as it is written down)."""

    guest_port: int
    host: str
    host_port: int
    token: str | None  # None: an open port


def load_exposed(value: object) -> dict[int, tuple[int, str | None]]:
    """Guest port -> (host port, token) as written down (`record["exposed"]`, a hibernation's request):
    an int for an open port (as before tokens existed), `{"host_port", "token"}` for a protected one."""
    found: dict[int, tuple[int, str | None]] = {}
    if isinstance(value, dict):
        for guest, entry in value.items():
            if isinstance(entry, dict):
                token = entry.get("token")
                found[int(guest)] = (int(entry["host_port"]), str(token) if token else None)
            else:
                found[int(guest)] = (int(entry), None)
    return found


class ExposedPorts:
    def __init__(
        self,
        into: Callable[[str], contextlib.AbstractAsyncContextManager[Path]],
        rules: Rules | None = None,
    ) -> None:
        """`into(sandbox_id)`: the sandbox's namespace for one connection, held while it lasts."""
        self._into = into
        self.rules = rules or Rules()
        self._forwards: dict[str, dict[int, PortForward]] = {}
        self._tenants: dict[str, str] = {}  # sandbox -> tenant, of sandboxes with forwards
        self._tokens: dict[str, str] = {}  # sandbox -> its traffic token, once one was asked for
        self._connections: Counter[str] = Counter()  # in progress, by sandbox and by "tenant:" + name
        self._full: set[str] = set()  # sandboxes whose connections were refused since a slot was freed

    async def listen(
        self, sandbox_id: str, guest_port: int, *, tenant: str, protect: bool = False
    ) -> Exposure:
        """The host address forwarding to `guest_port` (made on first ask, within the bounds). With
        `protect` (or the rules' `require_token`), connections must present the sandbox's traffic
        token; an open port asked again with `protect` becomes protected (never the other way)."""
        protect = protect or self.rules.require_token
        forward = self._forwards.get(sandbox_id, {}).get(guest_port)
        if forward is None:
            self._check_room(sandbox_id, tenant)
            token = self.token(sandbox_id) if protect else None
            forward = await self._start(sandbox_id, guest_port, tenant, 0, token)
        if protect and forward.token is None:
            forward.token = self.token(sandbox_id)
            forward.cut()  # connections opened without the token do not outlive its protection
        return self._exposure(guest_port, forward)

    def _check_room(self, sandbox_id: str, tenant: str) -> None:
        b = self.rules
        have = len(self._forwards.get(sandbox_id, {}))
        if have >= b.ports_per_sandbox:
            raise QuotaExceeded(
                f"sandbox {sandbox_id} has {have} exposed ports, the most the policy allows "
                f"(network.max_exposed_ports_per_sandbox={b.ports_per_sandbox})"
            )
        tenant_has = sum(len(self._forwards.get(s, {})) for s, t in self._tenants.items() if t == tenant)
        if tenant_has >= b.ports_per_tenant:
            raise QuotaExceeded(
                f"tenant {tenant!r} has {tenant_has} exposed ports, the most the policy allows "
                f"(network.max_exposed_ports_per_tenant={b.ports_per_tenant})"
            )

    async def _start(
        self, sandbox_id: str, guest_port: int, tenant: str, host_port: int, token: str | None
    ) -> PortForward:
        forward = PortForward(
            lambda: self._into(sandbox_id),
            GUEST_IP,
            guest_port,
            token=token,  # set before it listens: no connection is ever accepted unprotected
            slot=lambda: self._slot(sandbox_id),
        )
        await forward.start(host_port)
        self._forwards.setdefault(sandbox_id, {})[guest_port] = forward
        self._tenants[sandbox_id] = tenant
        return forward

    def token(self, sandbox_id: str) -> str:
        """The sandbox's traffic token (made on first ask; the same for all its protected ports)."""
        return self._tokens.setdefault(sandbox_id, mint_token())

    def _slot(self, sandbox_id: str) -> Callable[[], None] | None:
        """A connection's slot in its sandbox's and its tenant's bounds, or None when either is full."""
        keys = (sandbox_id, "tenant:" + self._tenants.get(sandbox_id, ""))
        limits = (self.rules.connections_per_sandbox, self.rules.connections_per_tenant)
        if any(self._connections[k] >= limit for k, limit in zip(keys, limits, strict=True)):
            if sandbox_id not in self._full:  # once per flood, not once per connection
                self._full.add(sandbox_id)
                log.warning("connections to exposed ports of %s refused: too many in progress", sandbox_id)
            return None
        self._connections.update(keys)

        def give_back() -> None:
            self._connections.subtract(keys)
            self._full.discard(sandbox_id)

        return give_back

    async def listen_again(
        self, sandbox_id: str, ports: dict[int, tuple[int, str | None]], tenant: str
    ) -> None:
        """Listen again on the host ports a sandbox had (after a daemon restart), with the protection
        they had; one that cannot be made is logged, never a reason not to serve the sandbox (its
        client can ask again). The bounds held when they were made: they are not checked again."""
        for guest, (host, token) in sorted(ports.items()):
            if token is not None:
                self._tokens.setdefault(sandbox_id, token)
            try:
                await self._start(sandbox_id, guest, tenant, host, token)
            except OSError as e:
                log.warning("could not expose port %d of %s again: %s", guest, sandbox_id, e)

    def _exposure(self, guest_port: int, forward: PortForward) -> Exposure:
        host, port = forward.address
        return Exposure(guest_port, host, port, forward.token)

    def of(self, sandbox_id: str) -> dict[int, Exposure]:
        """A sandbox's exposed ports, by guest port."""
        return {guest: self._exposure(guest, f) for guest, f in self._forwards.get(sandbox_id, {}).items()}

    def written(self, sandbox_id: str) -> dict[str, object]:
        """A sandbox's exposed ports as `load_exposed` reads them back."""
        return {
            str(e.guest_port): {"host_port": e.host_port, "token": e.token} if e.token else e.host_port
            for e in self.of(sandbox_id).values()
        }

    async def unlisten(self, sandbox_id: str, guest_port: int) -> bool:
        """Stop exposing one port (its connections end); False if it was not exposed."""
        forward = self._forwards.get(sandbox_id, {}).pop(guest_port, None)
        if forward is None:
            return False
        await forward.close()
        return True

    def cut(self, sandbox_id: str) -> None:
        """End the connections open to a sandbox, keeping its listeners (it is about to hibernate)."""
        for forward in self._forwards.get(sandbox_id, {}).values():
            forward.cut()

    async def close(self, sandbox_id: str) -> None:
        for forward in self._forwards.pop(sandbox_id, {}).values():
            await forward.close()
        self._tenants.pop(sandbox_id, None)
        self._tokens.pop(sandbox_id, None)

    async def close_all(self) -> None:
        for sandbox_id in list(self._forwards):
            await self.close(sandbox_id)
