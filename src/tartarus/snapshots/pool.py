"""A small, bounded pool of pre-started VMMs per snapshot, refilled in the background.

A pooled VMM is QEMU waiting with `-incoming defer` and its own writable layer: no guest has run in it,
so taking one keeps a create "cold" while saving process start-up. An empty pool never fails a create;
the caller just prepares its own VMM.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path

from tartarus.limits.spec import template_limits
from tartarus.runtime.sandbox import RuntimeSandbox, SandboxOptions
from tartarus.snapshots.restore import prepare
from tartarus.snapshots.store import Snapshot
from tartarus.templates.store import Template

log = logging.getLogger(__name__)

RETRY_S = 1.0
# Spare VMMs start at low priority so that spawning them never slows the sandboxes running now.
SPARE_NICE = 10


class DeferredRefills:
    """Refills asked for while held; `release()` runs them, and any asked for later run at once."""

    def __init__(self) -> None:
        self._pending: list[Callable[[], None]] | None = []

    def add(self, refill: Callable[[], None]) -> bool:
        """Hold `refill` for `release()`; False if already released (the caller runs it now)."""
        if self._pending is None:
            return False
        if refill not in self._pending:
            self._pending.append(refill)
        return True

    def release(self) -> None:
        pending, self._pending = self._pending, None
        for refill in pending or ():
            refill()


_deferred: ContextVar[DeferredRefills | None] = ContextVar("deferred_refills", default=None)


@contextlib.contextmanager
def refills_deferred() -> Iterator[DeferredRefills]:
    """Within the block, refills wait for `release()` (at the latest, the block's end).

    The daemon holds them for each request until its response starts: a create that took a pooled
    VMM stores its record, audits the call and answers before the replacement VMM is spawned, whose
    set-up (a sparse copy, cgroups, fork/exec of QEMU) would otherwise run on the event loop in
    between and add milliseconds to the create's answer. Failed requests release them too; tasks a
    request started that refill after it answered refill at once.
    """
    held = DeferredRefills()
    token = _deferred.set(held)
    try:
        yield held
    finally:
        _deferred.reset(token)
        held.release()


class VMMPool:
    def __init__(
        self, snapshot: Snapshot, template: Template, root: Path, size: int, *, outlive_owner: bool = False
    ) -> None:
        self.snapshot = snapshot
        self.template = template
        self.root = root
        self.size = size
        self.outlive_owner = outlive_owner
        self._ready: collections.deque[RuntimeSandbox] = collections.deque()
        self._dead: list[RuntimeSandbox] = []
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._refill(), name=f"pool-{template.name}")

    def __len__(self) -> int:
        return len(self._ready)

    def take(self) -> RuntimeSandbox | None:
        """A ready VMM, or None if the pool is empty; never waits.

        Does not start the refill: spawning a VMM costs CPU the restore in progress needs, so the
        caller calls `refill()` once its restore is done.
        """
        while self._ready:
            sandbox = self._ready.popleft()
            if sandbox.vm is not None and sandbox.vm.running:
                return sandbox
            self._dead.append(sandbox)  # its VMM died while waiting; the refill task cleans it
        return None

    def refill(self) -> None:
        held = _deferred.get()
        if held is None or not held.add(self._wake.set):
            self._wake.set()

    async def _refill(self) -> None:
        while True:
            while self._dead:
                await self._dead.pop().destroy()
            while len(self._ready) < self.size:
                # Made with the template's limits, so its cgroups exist before the create call.
                options = SandboxOptions(
                    limits=template_limits(self.template), outlive_owner=self.outlive_owner
                )
                try:
                    sandbox = await prepare(self.snapshot, self.template, self.root, options, nice=SPARE_NICE)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("could not pre-start a VMM for %s; retrying", self.template.name)
                    await asyncio.sleep(RETRY_S)
                    continue
                self._ready.append(sandbox)
            self._wake.clear()
            await self._wake.wait()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for sandbox in [*self._ready, *self._dead]:
            await sandbox.destroy()
        self._ready.clear()
        self._dead.clear()
