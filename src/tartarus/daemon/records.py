"""The store kept in step with the table of sandboxes: a new sandbox is stored before its create answers;
every later change the table tells of (hibernated, woken, failed, destroyed, expired) is written as it
happens, in order, on the store's thread, with nothing polling for it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import ParamSpec, Protocol, TypeVar

from tartarus.daemon.manager import SandboxManager
from tartarus.daemon.metrics import Metrics
from tartarus.daemon.table import Change, SandboxRecord
from tartarus.errors import TartarusError
from tartarus.limits.spec import capped_timeout
from tartarus.store import DatabaseBusy, SandboxRow, Store

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class Db(Protocol):
    """`ControlPlane.db`: a store call run on the store's thread."""

    async def __call__(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T: ...


class StoredSandboxes:
    def __init__(
        self,
        manager: SandboxManager,
        metrics: Metrics,
        db: Db,
        store: Callable[[], Store],
        node: Callable[[], str],
        on_loop: Callable[[], Store | None] = lambda: None,
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self.db = db
        self.store = store
        self.node = node
        self.on_loop = on_loop  # `Store.on_loop`: a new row written on the loop, no thread hop
        self._writes: set[asyncio.Task[None]] = set()  # store updates of the table's changes, in order

    def open(self) -> bool:
        try:
            self.store()
        except TartarusError:
            return False
        return True

    async def insert(self, records: Iterable[SandboxRecord]) -> None:
        """Store new sandboxes; if that fails, destroy them (one nobody can find must not run on)."""
        records = list(records)
        try:
            for record in records:
                await self._insert(record.row(self.node()))
        except BaseException:
            for record in records:
                with contextlib.suppress(Exception):
                    await self.manager.destroy(record.id)
            raise

    async def _insert(self, row: SandboxRow) -> None:
        """On the loop when the store allows it (it never waits for a lock: busy, it goes to the store's
        thread), so a create's answer does not wait for a thread to be scheduled."""
        fast = self.on_loop()
        if fast is not None:
            with contextlib.suppress(DatabaseBusy):
                fast.insert_sandbox(row)
                return
        await self.db(self.store().insert_sandbox, row)

    async def set_timeout(self, sandbox_id: str, timeout: float | None) -> SandboxRow:
        """Destroy the sandbox `timeout` seconds from now, within the policy's `max_ttl_s` as a create's
        timeout is (InvalidArgument over it, and for None: never)."""
        record = self.manager.get(sandbox_id)
        timeout = capped_timeout(timeout, self.manager.policy.policy.limits)
        self.manager.set_ttl(sandbox_id, timeout)
        await self.db(
            self.store().update_sandbox, sandbox_id, timeout_s=record.timeout_s, expires_at=record.expires_at
        )
        return record.row(self.node())

    def changed(self, record: SandboxRecord, change: Change, why: str | None) -> None:
        """The table's hook: store a sandbox's change of state (a new one is stored by `persist`, awaited
        by the request that made it). Writes are queued in order on the store's thread."""
        if change == "created" or not self.open():
            return
        if change in ("destroyed", "expired"):
            if change == "expired":
                self.metrics.expired.inc()
                log.info(
                    "sandbox %s expired", record.id, extra={"sandbox": record.id, "tenant": record.tenant}
                )
            write = self.db(
                self.store().update_sandbox,
                record.id,
                state="destroyed",
                ended_at=time.time(),
                error=record.error or why,
            )
        else:
            write = self.db(self.store().update_sandbox, record.id, state=record.state, error=record.error)
        task = asyncio.ensure_future(write)
        self._writes.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Future[None]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("could not store a sandbox's change: %s", task.exception())

    async def flush(self) -> None:
        """Wait for the store updates of the changes told so far."""
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
