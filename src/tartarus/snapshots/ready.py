"""A bounded pool of ready sandboxes per template: restored, resumed, made distinct and warmed before
any request asks, so that a create only binds one to itself (`Sandbox.bind`) in milliseconds.

Each is a clone like any restore (its own id, hostname, machine-id, entropy and clock, told by the
restore's CONFIGURE call) whose interpreter has already answered once: the first calls after a resume
are slow under TCG (the guest's code is translated on first touch), and they are paid here. Its network
namespace is up with the `none` policy (no egress) until a create applies its own.

Refills run at low priority, and only while no create is in progress (`quiet`); a refill the daemon
holds (`defer`, as for `snapshots.pool`) waits until the create that took one has answered. Each
ready sandbox holds memory while it waits, so a refill is skipped while the host is short of it.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from tartarus.limits.spec import template_limits
from tartarus.sandbox.sandbox import Sandbox
from tartarus.snapshots.pool import SPARE_NICE, Defer, SparePool
from tartarus.snapshots.snapshot import Snapshot
from tartarus.templates.built import Template

log = logging.getLogger(__name__)

# A refill leaves at least this share of the host's memory available (MemAvailable) after the ready
# sandbox's guest memory, which it may come to use in full.
MEMORY_RESERVE = 0.25
MEMINFO = Path("/proc/meminfo")


def memory_allows(guest_mib: int, meminfo: Path = MEMINFO) -> bool:
    """Whether one more ready sandbox of `guest_mib` fits while keeping MEMORY_RESERVE available."""
    fields = {}
    for line in meminfo.read_text().splitlines():
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0]) if rest.split() else 0
    total, available = fields.get("MemTotal", 0), fields.get("MemAvailable", 0)
    return available - guest_mib * 1024 >= total * MEMORY_RESERVE


class WarmPool(SparePool):
    """Ready sandboxes of either backend: counted hits and misses, refills only while no create runs
    and memory allows; a subclass says how one is made warm (`_make`) and what memory it may use."""

    kind = "ready"

    def __init__(
        self,
        template: Template,
        root: Path,
        size: int,
        *,
        outlive_owner: bool = False,
        defer: Defer | None = None,
        quiet: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.hits = 0
        self.misses = 0
        self._quiet = quiet
        super().__init__(template, root, size, outlive_owner=outlive_owner, defer=defer)

    @property
    @abc.abstractmethod
    def guest_mib(self) -> int:
        """Memory one ready sandbox may come to use (what a refill must leave room for)."""

    def take(self) -> Sandbox | None:
        """A ready sandbox whose VMM still runs, or None (counted as a miss); never waits. The caller
        binds it (`Sandbox.bind`) and calls `refill()` once its create is done."""
        while self._ready:
            sandbox = self._ready.popleft()
            if sandbox.alive:
                self.hits += 1
                return sandbox
            log.warning("ready sandbox %s of %s died while waiting", sandbox.id, self.template.name)
            self._dead.append(sandbox)  # the refill task destroys it
        self.misses += 1
        return None

    def decline(self) -> None:
        """Count a create this pool cannot serve (another shape, a quarantine verdict): a miss."""
        self.misses += 1

    async def _may_grow(self) -> bool:
        if self._quiet is not None:
            await self._quiet()
        if not memory_allows(self.guest_mib):
            log.warning("ready pool of %s stays at %d: host memory is short", self.template.name, len(self))
            return False
        return True


class ReadyPool(WarmPool):
    def __init__(
        self,
        snapshot: Snapshot,
        template: Template,
        root: Path,
        size: int,
        *,
        outlive_owner: bool = False,
        defer: Defer | None = None,
        quiet: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.snapshot = snapshot
        super().__init__(template, root, size, outlive_owner=outlive_owner, defer=defer, quiet=quiet)

    @property
    def guest_mib(self) -> int:
        return self.snapshot.memory_mib

    async def _make(self) -> Sandbox:
        return await self._warm()

    async def _warm(self, sandbox_id: str | None = None) -> Sandbox:
        """A restored clone at low priority, its interpreter and command path run once."""
        limits = template_limits(self.template)
        prepared = await Sandbox.prepare(
            self.snapshot,
            self.template,
            self.root,
            limits=limits,
            outlive_owner=self.outlive_owner,
            nice=SPARE_NICE,
            sandbox_id=sandbox_id,
        )
        sandbox = await Sandbox.restore(
            self.snapshot, self.template, self.root, None, prepared, limits=limits, nice=SPARE_NICE
        )
        await warm_up(sandbox)
        return sandbox


async def warm_up(sandbox: Sandbox) -> None:
    """Run the sandbox's interpreter and command path once (the first calls after a restore are slow:
    code translated or memory faulted in on first touch), so a create does not pay for them. Destroys
    it on failure."""
    try:
        if sandbox.template.preload is not None:
            answer = await (await sandbox.code_interpreter()).run_code("1+1")
            if answer.result != "2":
                raise RuntimeError(f"warm-up run_code('1+1') answered {answer}")
        process = await sandbox.agent.exec(["true"])
        async for _ in process.events():
            pass
    except BaseException:
        await sandbox.destroy()
        raise
