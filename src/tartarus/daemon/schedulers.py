"""What the daemon does on its own, on a clock: destroy sandboxes whose lifetime (TTL) is over, hibernate
idle ones, delete expired checkpoints, and quarantine sandboxes whose traffic trips a trigger."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tartarus import audit
from tartarus.daemon.lifecycle import Lifecycle
from tartarus.daemon.table import SandboxTable
from tartarus.errors import NotFound
from tartarus.limits.ttl import Deadlines
from tartarus.policy.model import QuarantineSettings
from tartarus.quarantine.triggers import RefusedPacketsTrigger

log = logging.getLogger(__name__)

IDLE_CHECK_S = 1.0
CHECKPOINT_SWEEP_S = 60.0  # how often expired checkpoints are deleted (their TTLs are hours to days)

Quarantine = Callable[[str, str, str], Awaitable[object]]  # (sandbox id, reason, by)


class Schedulers:
    def __init__(self, state_dir: Path, table: SandboxTable, lifecycle: Lifecycle) -> None:
        self.state_dir = state_dir
        self.table = table
        self.lifecycle = lifecycle
        self._deadlines = Deadlines()
        self._ttl_s: dict[str, float] = {}  # the timeout each deadline was set with, for the record
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, quarantine: QuarantineSettings, confine: Quarantine) -> None:
        """Watch for idle sandboxes and expired checkpoints, and run the runtime quarantine triggers
        (policy `quarantine.refused_packets`); call from the event loop."""
        self._tasks.append(asyncio.create_task(self._hibernate_idle(), name="idle-hibernation"))
        self._tasks.append(asyncio.create_task(self._sweep_checkpoints(), name="checkpoint-expiry"))
        if quarantine.refused_packets is not None:
            trigger = RefusedPacketsTrigger(quarantine.refused_packets, quarantine.window_s, confine)
            self._tasks.append(
                asyncio.create_task(trigger.run(self.table.running), name="quarantine-triggers")
            )

    async def close(self) -> None:
        await self._deadlines.close()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    # ---- lifetimes ------------------------------------------------------------------------------

    def set_ttl(self, id_: str, seconds: float | None) -> None:
        """Destroy the sandbox `seconds` from now (None: never), replacing its TTL."""
        self.table.get(id_)
        if seconds is None:
            self.forget(id_)
        else:
            self._deadlines.schedule(id_, seconds, lambda: self._expire(id_))
            self._ttl_s[id_] = seconds

    def forget(self, id_: str) -> None:
        self._deadlines.cancel(id_)
        self._ttl_s.pop(id_, None)

    async def _expire(self, id_: str) -> None:
        if self.table.find(id_) is None:
            return
        ttl = self._ttl_s.pop(id_, None)
        why = (
            f"was destroyed: its timeout of {ttl:g} s expired"
            if ttl
            else "was destroyed: its timeout expired"
        )
        audit.record(self.state_dir, "sandbox.expired", sandbox=id_, ttl_s=ttl)
        log.info("sandbox %s %s", id_, why)
        with contextlib.suppress(NotFound):
            await self.lifecycle.destroy(id_, why, "expired")

    # ---- idle hibernation -----------------------------------------------------------------------

    async def _hibernate_idle(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_S)  # a periodic scan, not a wait for work
            now = time.monotonic()
            for record in self.table.list():
                timeout = record.idle_timeout
                if (
                    timeout is not None
                    and record.state == "running"
                    and record.busy == 0
                    and record.connections == 0
                    and not record.lock.locked()
                    and now - record.last_active > timeout
                ):
                    try:
                        await self.lifecycle.hibernate(record.id)
                    except Exception as e:  # it keeps running; try again after the next idle period
                        record.last_active = time.monotonic()
                        log.warning("could not hibernate idle sandbox %s: %s", record.id, e)

    # ---- checkpoint expiry ----------------------------------------------------------------------

    async def _sweep_checkpoints(self) -> None:
        """Delete checkpoints whose TTL has passed (`gc` does too, on demand)."""
        while True:
            await asyncio.sleep(CHECKPOINT_SWEEP_S)  # a periodic scan, not a wait for work
            try:  # on the loop: a restore from a checkpoint touches it (its last use) on the loop too
                removed = self.lifecycle.delete_expired_checkpoints()
            except Exception:
                log.exception("could not delete expired checkpoints")
                continue
            if removed:
                log.info("deleted %d expired checkpoints: %s", len(removed), ", ".join(removed))
