"""The append-only audit log: one JSON line per state-changing action, in `<state>/audit.log`.

Written with O_APPEND (so concurrent writers never interleave within a line) and fsynced before returning,
so an action the caller was told succeeded is on disk even if the daemon is killed right after.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.log"


def record(state_dir: Path, action: str, **fields: Any) -> None:
    """Append `{"ts", "action", **fields}` as one line to the state dir's audit log."""
    line = json.dumps({"ts": time.time(), "action": action, **fields}, default=str, sort_keys=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / AUDIT_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, line.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
