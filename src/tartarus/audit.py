"""The audit log: one JSON line per security-relevant action in `<state_dir>/audit.log`.

Appends with O_APPEND under an exclusive flock (one write per line; the lock also makes the torn-line
check below see only whole writes, since a concurrent write can be visible half-done in st_size) and
fsync (a recorded action survives a crash of the daemon or the host right after it). `record` does
both at once; the daemon's API calls go through an `AuditLog`, which writes at once and fsyncs in
groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

AUDIT_LOG = "audit.log"
_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC

log = logging.getLogger(__name__)


def _line(action: str, fields: dict[str, Any]) -> bytes:
    """`{"ts", "action", **fields}` on one line; values that are not JSON become their str()."""
    line = json.dumps({"ts": time.time(), "action": action, **fields}, default=str, sort_keys=False)
    return (line.replace("\n", " ") + "\n").encode()


def _append(fd: int, data: bytes) -> None:
    """One write of a whole line, under the file's lock."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # the last write was torn by a crash: never glue a record onto it
        os.write(fd, data)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def record(state_dir: Path, action: str, **fields: Any) -> None:
    """Append `{"ts", "action", **fields}` and fsync it before returning."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / AUDIT_LOG, _FLAGS, 0o600)
    try:
        _append(fd, _line(action, fields))
        os.fsync(fd)
    finally:
        os.close(fd)


class AuditLog:
    """`<state_dir>/audit.log` held open by the daemon, with a group commit.

    `append` writes a whole line (one write(2) under the lock, as `record`) and returns at once: the
    line is in the kernel's page cache, so it survives the daemon being killed. One thread fsyncs
    whatever was written since its last fsync, so lines written while an fsync runs share the next one,
    and a request never waits behind another's flush; `synced(n)` waits until line `n` is on disk (it
    then survives a crash of the host too). `append` runs on the event loop: a small write to the page
    cache, no flush."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(state_dir / AUDIT_LOG, _FLAGS, 0o600)
        self._lock = threading.Condition()
        self._written = 0  # lines appended so far
        self._synced = 0  # of which fsynced
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._flush, name="tartarus-audit-sync", daemon=True)
        self._thread.start()

    def append(self, action: str, **fields: Any) -> int:
        """Write the line now (fsynced soon after); its number, for `synced`."""
        data = _line(action, fields)
        with self._lock:
            if self._closed:
                raise RuntimeError("the audit log is closed")
            _append(self._fd, data)
            self._written += 1
            self._lock.notify()
            return self._written

    async def synced(self, line: int) -> None:
        """Until line `line` is fsynced; OSError if the fsync covering it failed."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._synced >= line:
                return
            self._waiting.append((line, future))
        await future

    def close(self) -> None:
        """Fsync what is left and close the file (blocks: call off the event loop)."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()
        os.close(self._fd)

    def _flush(self) -> None:
        while True:
            with self._lock:
                while self._synced == self._written and not self._closed:
                    self._lock.wait()
                if self._synced == self._written:
                    return  # closed, nothing left
                upto = self._written  # every line counted here was written before it was counted
            error: OSError | None = None
            try:
                os.fsync(self._fd)
            except OSError as e:
                log.error("could not fsync the audit log: %s", e)
                error = e
            with self._lock:
                self._synced = upto
                done = [w for w in self._waiting if w[0] <= upto]
                self._waiting = [w for w in self._waiting if w[0] > upto]
            for _, future in done:
                with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits any more
                    future.get_loop().call_soon_threadsafe(_settle, future, error)


def _settle(future: asyncio.Future[None], error: OSError | None) -> None:
    if future.done():
        return  # its waiter was cancelled
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


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
