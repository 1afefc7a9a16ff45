"""A daemon's start and stop around its state directory: it takes the directory (an flock, so two
daemons never reap each other's VMs), puts back wakes a previous daemon died in, reaps what it left,
finds its hibernated sandboxes again and takes over the ones still running (live restore), which it
writes down (`sandbox.descriptor`) for the next daemon; stopping with `keep_on_stop`, it lets them run."""

from __future__ import annotations

import builtins
import fcntl
import logging
import os
import shutil
from pathlib import Path
from typing import IO, Any

from tartarus import audit, private
from tartarus.daemon.config import DaemonConfig
from tartarus.daemon.ports import ExposedPorts, load_exposed
from tartarus.daemon.table import SandboxRecord, SandboxTable
from tartarus.errors import Conflict
from tartarus.network.sandbox import reap_orphans
from tartarus.policy import PolicyEngine
from tartarus.private import make_private
from tartarus.sandbox import capture, descriptor
from tartarus.sandbox.layout import Layout
from tartarus.sandbox.reap import reap_leftovers, reap_workdir
from tartarus.sandbox.sandbox import Sandbox
from tartarus.sandbox.saved import list_saved
from tartarus.snapshots.snapshot import Snapshot
from tartarus.templates.built import get_template

log = logging.getLogger(__name__)


class Recovery:
    def __init__(
        self,
        state_dir: Path,
        config: DaemonConfig,
        table: SandboxTable,
        ports: ExposedPorts,
        policy: PolicyEngine,
    ) -> None:
        self.state_dir = state_dir
        self.layout = Layout(state_dir)
        self.config = config
        self.table = table
        self.ports = ports
        self.policy = policy
        self._lock_file: IO[str] | None = None
        self._adoptable: dict[Path, dict[str, Any]] = {}

    def open(self) -> list[str]:
        """Take ownership of the state directory and reap leftovers. Returns the ids reaped."""
        make_private(self.state_dir)  # before anything is written in it: tenants' data only we may read
        lock = open(self.state_dir / "daemon.lock", "a+", opener=private.opener)  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise Conflict(f"another tartarus daemon owns {self.state_dir}") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock_file = lock
        # Before the leftovers are reaped: a wake cut short may have left the only copy of a sandbox.
        restored, lost = capture.recover_wakes(self.layout)
        if restored:
            log.warning(
                "put back %d sandboxes whose wake a previous daemon left: %s",
                len(restored),
                ", ".join(restored),
            )
        if lost:
            log.error("lost %d sandboxes that a previous daemon died waking: %s", len(lost), ", ".join(lost))
        hibernated = list_saved(self.layout.hibernated, self.layout.seal)
        self._adoptable = self._find_adoptable({saved.id for saved in hibernated})
        sandboxes = self.layout.sandboxes
        reaped = reap_leftovers(sandboxes, keep=set(self._adoptable))
        if reaped:
            log.warning("reaped %d sandboxes left by a previous daemon: %s", len(reaped), ", ".join(reaped))
        sandboxes.mkdir(mode=private.PRIVATE_DIR, exist_ok=True)
        reap_orphan_namespaces()
        for staging in self.layout.checkpoints.glob(".*.staging"):
            shutil.rmtree(staging, ignore_errors=True)
        for saved in hibernated:
            record = SandboxRecord(
                saved.id,
                saved.template,
                saved.spec,
                None,
                "hibernated",
                saved=saved,
                created_at=saved.created_at,
            )
            self.table.load(record)
        return reaped

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _find_adoptable(self, hibernated: set[str]) -> dict[Path, dict[str, Any]]:
        """Working directories of sandboxes whose VMM outlived the previous daemon, by descriptor.
        One that hibernated (committed) meanwhile is not: its saved sandbox is the sandbox now."""
        found: dict[Path, dict[str, Any]] = {}
        if not self.config.live_restore or not self.layout.sandboxes.exists():
            return found
        for workdir in self.layout.sandboxes.iterdir():
            data = descriptor.read(workdir, self.layout.seal) if workdir.is_dir() else None
            if data is not None and _still_running(data, workdir, hibernated):
                capture.undo_staging(workdir)  # it died mid-hibernation, before the commit point
                found[workdir] = data
        return found

    async def adopt_running(self) -> list[str]:
        """Take over the sandboxes `open` found running (call from the event loop, before serving).
        One that cannot be reconnected to is reaped. Listens again on the exposed ports of those and
        of the hibernated ones. Returns the ids taken over."""
        adopted: list[str] = []
        adoptable, self._adoptable = self._adoptable, {}
        for workdir, data in adoptable.items():
            try:
                found = descriptor.parse(data)
                template = get_template(found.template)
                runtime = await Sandbox.attach(found, template, workdir)
            except Exception as e:
                log.warning("could not take over sandbox %s (%s): reaping it", data.get("id"), e)
                reap_workdir(workdir)
                continue
            snapshot = None
            if found.snapshot and (found.snapshot / "snapshot.json").exists():
                snapshot = Snapshot.load(found.snapshot)
            record = SandboxRecord(
                runtime.id, template, found.spec, runtime, "running", snapshot, created_at=runtime.created_at
            )
            self.table.load(record)
            await self._listen_again(runtime.id, found.exposed, record.tenant)
            adopted.append(runtime.id)
        if adopted:
            log.warning("took over %d running sandboxes: %s", len(adopted), ", ".join(adopted))
            audit.record(self.state_dir, "sandbox.adopted", sandboxes=adopted)
        for record in self.table.list():
            if record.saved is not None:
                await self._listen_again(record.id, record.saved.exposed, record.tenant)
        return adopted

    async def _listen_again(self, id_: str, exposed: object, tenant: str) -> None:
        if self.policy.policy.network.expose:
            await self.ports.listen_again(id_, load_exposed(exposed), tenant)

    def save(self, record: SandboxRecord) -> None:
        """Write down a running sandbox for the next daemon (`tartarus.sandbox.descriptor`). Failing to
        is not the caller's failure: the sandbox runs on, and a daemon that crashes would reap it."""
        if not self.config.live_restore or record.runtime is None or record.state != "running":
            return
        try:
            self._describe(record)
        except OSError as e:
            log.warning("could not describe sandbox %s for a restarted daemon: %s", record.id, e)

    def _describe(self, record: SandboxRecord) -> None:
        assert record.runtime is not None
        record.runtime.describe(
            self.layout.seal,
            snapshot=record.snapshot.path if record.snapshot else None,
            exposed=self.ports.written(record.id),
        )

    async def let_go(self) -> set[str]:
        """Leave the running sandboxes running, described for the next daemon; returns their ids (their
        records stay, still `running`, so the store keeps them so)."""
        kept: set[str] = set()
        for record in self.table.list():
            if record.state != "running" or record.runtime is None or record.lock.locked():
                continue  # one mid-operation is destroyed: it cannot be described consistently
            try:
                self._describe(record)
                await record.runtime.detach()
            except Exception:
                log.exception("could not leave sandbox %s running; destroying it", record.id)
                continue
            kept.add(record.id)
        if kept:
            log.info("left %d sandboxes running for the next daemon", len(kept))
        return kept


def _still_running(data: dict[str, Any], workdir: Path, hibernated: set[str]) -> bool:
    """The described sandbox's VMM (or runsc sandbox) runs, and its hibernation (if any) did not
    commit. A damaged descriptor counts as none: the directory is reaped."""
    try:
        return data["id"] not in hibernated and descriptor.still_runs(data, workdir)
    except (KeyError, TypeError, ValueError):
        return False


def reap_orphan_namespaces() -> builtins.list[str]:
    """Host-wide: what crashed daemons or removed state dirs left (`network.sandbox.reap_orphans`)."""
    try:
        return reap_orphans()
    except Exception as e:  # never a reason not to start: no root (no networking at all), a busy netns
        log.warning("could not look for orphaned sandbox namespaces: %s", e)
        return []
