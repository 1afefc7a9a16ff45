"""Result shapes both ends of the API share: the daemon builds them, the SDK hands them to users.

They live here, beside `errors`, rather than in `runtime/` or `sdk/`, because each side may import only
neutral modules of the other: the SDK imports no server code and the server never imports the SDK.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExecutionError:
    name: str
    value: str
    traceback: str


@dataclass(frozen=True)
class Execution:
    stdout: str
    stderr: str
    result: str | None
    error: ExecutionError | None
