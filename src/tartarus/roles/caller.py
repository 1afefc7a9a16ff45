"""Who a gateway says is calling: the key it authenticated, passed to the agent in one header.

The agent trusts this header only on a request that carried the agent token (`agent.AgentGuard`); the
agent's control plane then applies tenancy (other tenants' sandboxes are 404) and quotas as `serve` does.
"""

from __future__ import annotations

from tartarus.daemon.auth import Principal
from tartarus.errors import AuthError

CALLER_HEADER = "x-tartarus-caller"
SCHEME = "Gateway"  # the agent's guard rewrites Authorization to `Gateway <caller>` once the token checks


def encode(principal: Principal) -> str:
    return f"{principal.key_id} {principal.tenant} {'admin' if principal.admin else 'user'}"


def decode(value: str) -> Principal:
    parts = value.split()
    if len(parts) != 3 or parts[2] not in ("admin", "user"):
        raise AuthError("the gateway sent no valid caller (x-tartarus-caller: KEY_ID TENANT admin|user)")
    return Principal(parts[0], parts[1], parts[2] == "admin")
