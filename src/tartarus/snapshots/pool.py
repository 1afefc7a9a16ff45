"""A small, bounded pool of pre-started VMMs per snapshot, refilled in the background.

A pooled VMM is QEMU waiting with `-incoming defer` and its own writable layer: no guest has run in it,
so taking one keeps a create "cold" while saving process start-up. An empty pool never fails a create;
the caller just prepares its own VMM.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from tartarus.hibernation import lazy
from tartarus.limits.spec import template_limits
from tartarus.sandbox.sandbox import Sandbox
from tartarus.snapshots.snapshot import Snapshot
from tartarus.templates.built import Template

log = logging.getLogger(__name__)

RETRY_S = 1.0
# Spare VMMs start at low priority so that spawning them never slows the sandboxes running now.
SPARE_NICE = 10


# Holds a refill for later and says so (True), or declines (False: the pool refills at once). The daemon
# holds them while it answers a request (`tartarus.daemon.refills`).
Defer = Callable[[Callable[[], None]], bool]


class SparePool(abc.ABC):
    """Sandboxes made ahead of any request and kept, up to `size`, by one background refill task; a
    subclass says how one is made (`_make`) and may hold a refill back (`_may_grow`)."""

    kind = "pool"

    def __init__(
        self,
        template: Template,
        root: Path,
        size: int,
        *,
        outlive_owner: bool = False,
        defer: Defer | None = None,
    ) -> None:
        self.template = template
        self.root = root
        self.size = size
        self.outlive_owner = outlive_owner
        self._defer = defer
        self._ready: collections.deque[Sandbox] = collections.deque()
        self._dead: list[Sandbox] = []
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._refill(), name=f"{self.kind}-{template.name}")

    def __len__(self) -> int:
        return len(self._ready)

    def refill(self) -> None:
        """Start making up for sandboxes taken or dead (now, or when `defer` lets it)."""
        if self._defer is None or not self._defer(self._wake.set):
            self._wake.set()

    @abc.abstractmethod
    async def _make(self) -> Sandbox: ...

    async def _may_grow(self) -> bool:
        """Whether the refill may make one more now (it waits here if it should wait)."""
        return True

    async def _refill(self) -> None:
        while True:
            while self._dead:
                await self._dead.pop().destroy()
            while len(self._ready) < self.size:
                if not await self._may_grow():
                    break
                try:
                    sandbox = await self._make()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception(
                        "could not make a %s sandbox of %s; retrying", self.kind, self.template.name
                    )
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


class VMMPool(SparePool):
    """Spare VMMs mapping the snapshot's memory file, or (for lazy wakes on a filesystem with
    reflinks) each a clone of `memory_from` of its own (the snapshot's memory pinned in the state
    directory), into which a wake clones a sandbox's pages."""

    kind = "pool"

    def __init__(
        self,
        snapshot: Snapshot,
        template: Template,
        root: Path,
        size: int,
        *,
        outlive_owner: bool = False,
        defer: Defer | None = None,
        memory_from: Path | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.memory_from = memory_from
        super().__init__(template, root, size, outlive_owner=outlive_owner, defer=defer)

    def take(self) -> Sandbox | None:
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

    async def _make(self) -> Sandbox:
        return await self._spare()

    async def _spare(self, sandbox_id: str | None = None) -> Sandbox:
        """A spare VMM, with the template's limits, so its cgroups exist before the create call."""
        return await Sandbox.prepare(
            self.snapshot,
            self.template,
            self.root,
            limits=template_limits(self.template),
            outlive_owner=self.outlive_owner,
            nice=SPARE_NICE,
            sandbox_id=sandbox_id,
            memory=lazy.template_clone(self.memory_from) if self.memory_from else None,
        )
