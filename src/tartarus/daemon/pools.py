"""The daemon's pools of pre-started VMMs (`snapshots.pool`), one per template snapshot, its pools of
ready sandboxes (`snapshots.ready`), one per template sized by `DaemonConfig.ready_pool`, and when they
may refill: not while a request that took one is still being answered, and (ready sandboxes, whose
restore costs tens of ms of CPU) not while any create is in progress (`starting`).

A create that took a pooled VMM stores its record, audits the call and answers before the replacement
VMM is spawned, whose set-up (a sparse copy, cgroups, fork/exec of QEMU) would otherwise run on the
event loop in between and add milliseconds to the create's answer. The request middleware holds the
refills of each request (`refills_deferred`) until its response starts; failed requests release them
too; tasks a request started that refill after it answered refill at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from tartarus.daemon.config import ReadySizes
from tartarus.hibernation import reflink
from tartarus.sandbox.layout import Layout
from tartarus.sandbox.sandbox import Sandbox
from tartarus.sandbox.saved import SavedSandbox
from tartarus.snapshots.gvisor_pool import GvisorPool, GvisorReadyPool
from tartarus.snapshots.pool import VMMPool
from tartarus.snapshots.ready import ReadyPool, WarmPool
from tartarus.snapshots.snapshot import Snapshot, find_snapshot
from tartarus.templates.built import Template, list_templates


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


def defer(refill: Callable[[], None]) -> bool:
    """A pool's `defer` hook: hold `refill` if the current request holds refills."""
    held = _deferred.get()
    return held is not None and held.add(refill)


@contextlib.contextmanager
def refills_deferred() -> Iterator[DeferredRefills]:
    """Within the block, refills wait for `release()` (at the latest, the block's end)."""
    held = DeferredRefills()
    token = _deferred.set(held)
    try:
        yield held
    finally:
        _deferred.reset(token)
        held.release()


@dataclass(frozen=True)
class ReadyStats:
    """The ready pools as metrics read them: sandboxes waiting, creates served by one, and not."""

    size: int
    hits: int
    misses: int


# How long after the last start a ready pool's refill waits: a new sandbox's first calls (its client's
# run_code, commands) follow its create within milliseconds, and the refill's restore (tens of ms of
# CPU, some on the event loop) must not fall between them.
SETTLE_S = 0.1


class Starts:
    """Starts in progress; `quiet()` returns once there are none and the last ended `settle_s` ago
    (a ready pool's refill waits for it)."""

    def __init__(self, settle_s: float = SETTLE_S) -> None:
        self.settle_s = settle_s
        self._count = 0
        self._ended = -settle_s
        self._quiet = asyncio.Event()
        self._quiet.set()

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        self._count += 1
        self._quiet.clear()
        try:
            yield
        finally:
            self._count -= 1
            self._ended = time.monotonic()
            if not self._count:
                self._quiet.set()

    async def quiet(self) -> None:
        while True:
            await self._quiet.wait()
            left = self._ended + self.settle_s - time.monotonic()
            if left <= 0 and self._quiet.is_set():
                return
            await asyncio.sleep(max(left, 0))


class Pools:
    def __init__(
        self,
        root: Path,
        size: int,
        *,
        outlive_owner: bool,
        ready: ReadySizes | None = None,
        gvisor: bool = False,
    ) -> None:
        self.root = root
        self.gvisor = gvisor  # the daemon's default backend is gvisor: its ready sandboxes are too
        self.size = size
        self.outlive_owner = outlive_owner
        self.ready_sizes = ready or ReadySizes()
        self.starts = Starts()
        self._pools: dict[str, VMMPool] = {}
        self._ready: dict[str, ReadyPool] = {}
        self._gvisor: dict[str, GvisorPool] = {}
        self._gvisor_ready: dict[str, GvisorReadyPool] = {}

    def start(self) -> None:
        """Pre-start VMMs and ready sandboxes for every template that has a snapshot (gVisor ones when
        that is the daemon's default backend; call from the event loop)."""
        for template in list_templates():
            self.for_template(template)
            if self.gvisor:
                self.ready_for_gvisor(template)
            else:
                self.ready_for(template)

    def ready_for(self, template: Template) -> ReadyPool | None:
        """The template's ready pool (made on first use), or None if it has none."""
        pool = self._ready.get(template.name)
        size = self.ready_sizes.of(template.name)
        if pool is None and size > 0 and template.snapshotted:
            snapshot = find_snapshot(template)
            if snapshot is not None:
                pool = ReadyPool(
                    snapshot,
                    template,
                    self.root,
                    size,
                    outlive_owner=self.outlive_owner,
                    defer=defer,
                    quiet=self.starts.quiet,
                )
                self._ready[template.name] = pool
        return pool

    def ready_for_gvisor(self, template: Template) -> GvisorReadyPool | None:
        """The template's ready gVisor sandboxes (restored, warmed, waiting), made on its first gVisor
        create, sized as its VM ready pool is; None without a warm image or a size."""
        size = self.ready_sizes.of(template.name)
        if size <= 0 or template.preload is None or template.start is not None:
            return None
        pool = self._gvisor_ready.get(template.key)
        if pool is None:
            pool = GvisorReadyPool(template, self.root, size, defer=defer, quiet=self.starts.quiet)
            self._gvisor_ready[template.key] = pool
        return pool

    def for_template(self, template: Template) -> VMMPool | None:
        snapshot = find_snapshot(template) if template.snapshotted else None
        if snapshot is None or self.size <= 0:
            return None
        return self._pool(snapshot, template)

    def for_gvisor(self, template: Template) -> GvisorPool | None:
        """The template's pool of created-ahead gVisor containers, made on its first gVisor create (a
        daemon whose sandboxes never run on gVisor keeps none); None if it has no warm image."""
        if self.size <= 0 or template.preload is None or template.start is not None:
            return None
        pool = self._gvisor.get(template.key)  # by build, as VMM pools go by snapshot: closed at `close`
        if pool is None:
            pool = self._gvisor[template.key] = GvisorPool(template, self.root, self.size, defer=defer)
        return pool

    def for_image(self, saved: SavedSandbox) -> VMMPool | None:
        """Its template's pool; where the state directory has reflinks, a pool of lazy-wake spares of
        the same snapshot instead (made on its first wake), each mapping a clone of the pinned memory."""
        base = self._pools.get(saved.snapshot_key)
        if base is None or not reflink.supported(self.root):
            return base
        key = f"{saved.snapshot_key}/lazy"
        pool = self._pools.get(key)
        if pool is None:
            pins = Layout(self.root.parent).pins
            pool = VMMPool(
                base.snapshot,
                base.template,
                self.root,
                self.size,
                outlive_owner=self.outlive_owner,
                defer=defer,
                memory_from=pins / saved.snapshot_key / "memory",
            )
            self._pools[key] = pool
        return pool

    def _pool(self, snapshot: Snapshot, template: Template) -> VMMPool:
        pool = self._pools.get(snapshot.key)
        if pool is None:
            pool = VMMPool(
                snapshot, template, self.root, self.size, outlive_owner=self.outlive_owner, defer=defer
            )
            self._pools[snapshot.key] = pool
        return pool

    @contextlib.contextmanager
    def take(self, pool: VMMPool | GvisorPool | None) -> Iterator[Sandbox | None]:
        """A pooled VMM (or None), and the pool's refill once the block (the restore) is done: spawning
        a VMM costs CPU the restore in progress needs."""
        prepared = pool.take() if pool is not None else None
        try:
            yield prepared
        finally:
            if pool is not None:
                pool.refill()

    @property
    def ready(self) -> int:
        return sum(len(p) for p in self._pools.values())

    @property
    def ready_stats(self) -> ReadyStats:
        pools: list[WarmPool] = [*self._ready.values(), *self._gvisor_ready.values()]
        return ReadyStats(
            sum(len(p) for p in pools), sum(p.hits for p in pools), sum(p.misses for p in pools)
        )

    async def close(self) -> None:
        for ready in self._ready.values():
            await ready.close()
        for pool in self._pools.values():
            await pool.close()
        for spares in [*self._gvisor.values(), *self._gvisor_ready.values()]:
            await spares.close()
        self._gvisor_ready.clear()
        self._pools.clear()
        self._gvisor.clear()
        self._ready.clear()
