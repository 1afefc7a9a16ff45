"""The audit log: one JSON line per security-relevant action in `<state_dir>/audit.log`.

Appends with O_APPEND under an exclusive flock (one write per line; the lock also makes the torn-line
check below see only whole writes, since a concurrent write can be visible half-done in st_size) and
fsync (a recorded action survives a crash of the daemon or the host right after it).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

AUDIT_LOG = "audit.log"


def record(state_dir: Path, action: str, **fields: Any) -> None:
    """Append `{"ts", "action", **fields}`; values that are not JSON become their str()."""
    line = json.dumps({"ts": time.time(), "action": action, **fields}, default=str, sort_keys=False)
    data = (line.replace("\n", " ") + "\n").encode()
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / AUDIT_LOG, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # the last write was torn by a crash: never glue a record onto it
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(state_dir: Path) -> list[dict[str, Any]]:
    """Every record, oldest first (for tests and `tartarus audit`). A line that is not a JSON object
    (a write torn by a crash of the host) is skipped, never fatal to reading the rest."""
    path = state_dir / AUDIT_LOG
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
