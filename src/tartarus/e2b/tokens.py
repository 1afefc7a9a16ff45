"""Which credential a data-plane request presents for the sandbox it is routed to: its access token
(`X-Access-Token`), on the code interpreter's port its traffic token too (all E2B's SDK sends with its
context calls), or for `/files` a URL signed with the access token (signed.py).

These are the daemon's own credentials scoped to the sandbox (daemon/scoped.py, handed out by create,
connect and info, minted with the caller's key): this layer neither mints nor verifies them, it makes the
request's calls with the one presented, and the daemon checks it (in constant time) on every call, so a
fault here cannot reach another sandbox. A token is matched to the routed sandbox only by its visible
prefix, which refuses another sandbox's token before anything is called. Tokens are never logged.
"""

from __future__ import annotations

from tartarus.e2b.routing import ENVD_PORT, INTERPRETER_PORT, Target
from tartarus.e2b.signed import signed_credential
from tartarus.wire import SANDBOX_TOKEN


def _for(token: str | None, scope: str, sandbox_id: str) -> str | None:
    prefix = f"{SANDBOX_TOKEN}.{scope}.{sandbox_id}."
    return token if token is not None and token.startswith(prefix) else None


def credential(
    where: Target, method: str, path: str, query: bytes, access: str | None, traffic: str | None
) -> str | None:
    """The credential the request's calls are made with, or None: refused (401)."""
    found = _for(access, "data", where.sandbox_id)
    if found is not None:
        return found
    if where.port == INTERPRETER_PORT:
        return _for(traffic, "code", where.sandbox_id)
    if where.port == ENVD_PORT and access is None:
        return signed_credential(where.sandbox_id, method, path, query)
    return None
