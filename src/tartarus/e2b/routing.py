"""Which sandbox (and port) a request on the E2B port is for, or none: then it is a control-plane call.

E2B's SDK sends `E2b-Sandbox-Id` and `E2b-Sandbox-Port` on every data-plane request, so plain HTTP on one
address (`E2B_SANDBOX_URL`) is routed by them; signed URLs and `get_host` name the sandbox in the host,
`{port}-{sandboxID}.{domain}`, as E2B's proxy does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ENVD_PORT = 49983
INTERPRETER_PORT = 49999
_HOST = re.compile(r"^(?P<port>[0-9]{1,5})-(?P<id>[A-Za-z0-9][A-Za-z0-9-]{0,63})\.")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")


class RoutingError(ValueError):
    """The request names a sandbox, but not in a form this server accepts."""


@dataclass(frozen=True)
class Target:
    sandbox_id: str
    port: int


def target(sandbox_header: str | None, port_header: str | None, host: str | None) -> Target | None:
    if sandbox_header is not None:
        if not _ID.match(sandbox_header):
            raise RoutingError("E2b-Sandbox-Id is not a sandbox id")
        port = ENVD_PORT
        if port_header is not None:
            if not port_header.isdigit() or not 0 < int(port_header) < 65536:
                raise RoutingError("E2b-Sandbox-Port is not a port")
            port = int(port_header)
        return Target(sandbox_header, port)
    match = _HOST.match(host or "")
    if match is None:
        return None
    port = int(match["port"])
    if not 0 < port < 65536:
        raise RoutingError("the host names no valid port")
    return Target(match["id"], port)
