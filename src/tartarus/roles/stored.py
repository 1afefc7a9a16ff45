"""Hibernated sandboxes in the object store: uploaded by the agent that hibernated them, woken by whichever
agent a gateway places the wake on (issue 16).

Upload: once a hibernation commits on this node, its saved sandbox directory goes up as one capture
(`cluster.statestore`: content-addressed chunks, manifest last), every file as it is, unread here, so
the capture format may change without this module. Then, under the sandbox's lock and only if it is
still that hibernation (not woken meanwhile), its placement becomes `hibernated` with the capture's
name and this node forgets its copy: from that transaction on the placement row is the sandbox's only
owner, and a wake placed on any node (this one included) fetches it.

Wake: the agent the gateway reserved checks its lease is the reservation's epoch, fetches the capture
(every chunk verified) into `<state>/incoming/`, makes it a saved sandbox of this node (the template
re-pinned to this node's copy of the same snapshot, the env sealed under this node's key), publishes it
into `hibernated/` and wakes it through the daemon's one start path. It confirms the reservation itself
once the sandbox runs; if the reservation was lost meanwhile (the gateway gave up and released it, so
another node may wake the same capture) it stops the sandbox again, quietly: never two running copies
that are both served.

The record's env travels sealed under a key derived from the agent token (every agent has it; each
node's own env key stays its own). A sandbox's memory and files are in the store as they are: the
bucket must be as private as the agents' state directories.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psycopg

from tartarus.cluster.chunks import Hole, pieces
from tartarus.cluster.db import Connection, connect
from tartarus.cluster.model import Lease, check_name
from tartarus.cluster.objects import ObjectStore, S3Config
from tartarus.cluster.placement import Placer
from tartarus.cluster.statestore import StateStore
from tartarus.daemon.control import ControlPlane
from tartarus.daemon.manager import SandboxManager
from tartarus.daemon.table import SandboxRecord
from tartarus.errors import Conflict, InvalidArgument, TartarusError
from tartarus.private import PRIVATE_DIR, PRIVATE_FILE, write_private
from tartarus.roles.snapshot_sync import SnapshotSync, Transferred
from tartarus.roles.token import AgentToken
from tartarus.sandbox.saved import META, SavedSandbox, pin, pinned, publish, remove_saved
from tartarus.sealing import EnvSeal
from tartarus.templates.built import get_template

log = logging.getLogger(__name__)
T = TypeVar("T")

STORED_NODE = "object-store"  # the shared store's `node` of a sandbox hibernated in the object store
INCOMING = "incoming"  # under the state dir: captures being fetched (a crash leaves them to be reaped)
BASE = "cluster-base.sha256"  # in a capture, beside the saved sandbox's files: its snapshot's fingerprint
_fingerprints: dict[tuple[int, int, int, int], str] = {}
S3_ENV = ("TARTARUS_S3_ENDPOINT", "TARTARUS_S3_BUCKET", "TARTARUS_S3_ACCESS_KEY", "TARTARUS_S3_SECRET_KEY")


class SnapshotMissing(TartarusError):
    """This node lacks the exact template snapshot the capture was taken over (503: try another node)."""

    code = "snapshot_missing"
    status = 503


def s3_from_env() -> S3Config | None:
    """The object store from TARTARUS_S3_ENDPOINT, _BUCKET, _ACCESS_KEY and _SECRET_KEY (or
    _SECRET_KEY_FILE); None when none is set (the single-host default: hibernations stay on local disk)."""
    env = os.environ
    secret_file = env.get("TARTARUS_S3_SECRET_KEY_FILE")
    secret = Path(secret_file).read_text().strip() if secret_file else env.get(S3_ENV[3], "")
    values = [env.get(name, "") for name in S3_ENV[:3]] + [secret]
    if not any(values):
        return None
    if not all(values):
        missing = [name for name, value in zip(S3_ENV, values, strict=True) if not value]
        raise InvalidArgument(
            f"an object store needs all of {', '.join(S3_ENV)}: missing {', '.join(missing)}"
        )
    endpoint, bucket, access, _ = values
    return S3Config(endpoint, bucket, access, secret, env.get("TARTARUS_S3_REGION", "us-east-1"))


def transport_seal(token: AgentToken) -> EnvSeal:
    """The key a record's env is sealed under in the object store: HMAC-derived from the agent token, so
    every agent can open it and nothing else need be distributed (rotating the token strands the envs of
    captures taken before: wake them first)."""
    key = hmac.new(token.secret.encode(), b"tartarus capture env v1", hashlib.sha256).digest()
    return EnvSeal(key)


@dataclass(frozen=True)
class WakeRequest:
    """What a gateway asks of the agent it reserved for a wake."""

    sandbox_id: str
    capture: str
    epoch: int

    def __post_init__(self) -> None:
        check_name("sandbox id", self.sandbox_id)
        check_name("capture", self.capture)


@dataclass(frozen=True)
class Woken:
    fetch_s: float  # capture downloaded, verified and made this node's
    restore_s: float  # woken through the start path
    raw_bytes: int
    fetched_bytes: int


class StateSync:
    """This agent's side of sandboxes in the object store."""

    def __init__(self, objects: ObjectStore, token: AgentToken, database_url: str) -> None:
        self.state = StateStore(objects)
        self.transferred = Transferred({}, {})
        self.snapshots = SnapshotSync(self.state, self.transferred)
        self.transport = transport_seal(token)
        self.url = database_url
        self.uploads: dict[str, asyncio.Task[str | None]] = {}
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="tartarus-state")
        self._local = threading.local()
        self._manager: SandboxManager | None = None
        self._control: ControlPlane | None = None
        self._lease: Callable[[], Lease | None] = lambda: None

    def attach(
        self, manager: SandboxManager, control: ControlPlane, lease: Callable[[], Lease | None]
    ) -> None:
        self._manager, self._control, self._lease = manager, control, lease
        shutil.rmtree(manager.layout.state_dir / INCOMING, ignore_errors=True)  # a crashed fetch's

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def lease(self) -> Lease | None:
        return self._lease()

    @property
    def pool(self) -> ThreadPoolExecutor:
        return self._pool

    def upload(self, saved: SavedSandbox) -> str:
        """Upload a saved sandbox as a new capture (on the pool); its name."""
        return self._upload(saved)

    def adopt(self, staging: Path, saved_id: str, kind: str) -> SavedSandbox:
        return self._adopt(staging, saved_id, kind)

    def in_pool(self, fn: Callable[[Connection], T]) -> asyncio.Future[T]:
        """`fn` with this thread's database connection, on the state pool (off the event loop)."""
        return asyncio.get_running_loop().run_in_executor(self._pool, self._with_conn, fn)

    def _with_conn(self, fn: Callable[[Connection], T]) -> T:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._local.conn = connect(self.url)
        try:
            return fn(conn)
        except psycopg.Error:
            conn.close()
            raise

    @property
    def manager(self) -> SandboxManager:
        assert self._manager is not None, "StateSync.attach was not called"
        return self._manager

    # ---- upload -----------------------------------------------------------------------------------

    def hibernated(self, record: SandboxRecord) -> asyncio.Task[str | None] | None:
        """The table told of a hibernation: upload it (on the event loop, from the table's hook)."""
        saved = record.saved
        if saved is None:
            return None
        task = asyncio.get_running_loop().create_task(self._store(record.id, saved))
        self.uploads[record.id] = task
        task.add_done_callback(lambda done: self._upload_done(record.id, done))
        return task

    def _upload_done(self, sandbox_id: str, task: asyncio.Task[str | None]) -> None:
        if self.uploads.get(sandbox_id) is task:
            del self.uploads[sandbox_id]

    async def hibernate(self, sandbox_id: str) -> str | None:
        """Hibernate and wait until it is in the object store (drain); the capture, or None if the
        upload failed (it then wakes on this node only, as on a single host)."""
        record = await self.manager.hibernate(sandbox_id)
        task = self.uploads.get(sandbox_id) or self.hibernated(record)
        return None if task is None else await asyncio.shield(task)

    async def _store(self, sandbox_id: str, saved: SavedSandbox) -> str | None:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            capture = await loop.run_in_executor(self._pool, self._upload, saved)
        except Exception as e:
            log.warning("hibernated sandbox %s stays on this node only: its upload failed: %s", sandbox_id, e)
            return None
        manager = self.manager
        record = manager.table.find(sandbox_id)
        if record is None:
            return None
        async with record.lock:
            lease = self._lease()
            if manager.table.find(sandbox_id) is not record or record.saved is not saved or lease is None:
                log.info("sandbox %s changed during its upload: capture %s is not used", sandbox_id, capture)
                return None
            try:
                await loop.run_in_executor(self._pool, self._in_db, _mark, sandbox_id, lease, capture)
            except (TartarusError, psycopg.Error) as e:
                log.warning(
                    "sandbox %s stays on this node only: its placement was not marked: %s", sandbox_id, e
                )
                return None
            await forget(manager, record)
        await self._set_node(sandbox_id, STORED_NODE)
        log.info(
            "hibernated sandbox %s is in the object store as %s (%.2f s)",
            sandbox_id,
            capture,
            time.perf_counter() - t0,
        )
        return capture

    def _upload(self, saved: SavedSandbox) -> str:
        capture = f"{saved.id}.{secrets.token_hex(6)}"
        files: list[tuple[str, Path]] = []
        for path in sorted(saved.path.iterdir()):
            if path.name == META:
                continue
            if path.is_symlink() or not path.is_file():
                raise InvalidArgument(f"{path} is not a plain file: the saved sandbox cannot be uploaded")
            files.append((path.name, path))
        base = fingerprint(pinned(self.manager.layout.pins, saved.snapshot_key).memory)
        with tempfile.TemporaryDirectory(prefix=".upload-", dir=self.manager.layout.state_dir) as tmp:
            portable = Path(tmp) / META
            write_private(portable, saved.to_json(self.transport))
            write_private(Path(tmp) / BASE, base)
            stats = self.state.upload(capture, [*files, (META, portable), (BASE, Path(tmp) / BASE)])
        self.transferred.add_sent(saved.kind, stats.sent_bytes)
        return capture

    # ---- wake -------------------------------------------------------------------------------------

    async def wake(self, request: WakeRequest) -> Woken:
        """Fetch the capture and wake it here under the reservation the gateway holds for this node."""
        manager = self.manager
        lease = self._lease()
        if lease is None or lease.epoch != request.epoch:
            raise Conflict(f"this node's epoch is not {request.epoch}: the reservation is not this node's")
        if manager.table.find(request.sandbox_id) is not None:
            raise Conflict(f"sandbox {request.sandbox_id} is already on this node")
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        incoming = manager.layout.state_dir / INCOMING
        incoming.mkdir(mode=PRIVATE_DIR, exist_ok=True)
        staging = incoming / f"{request.sandbox_id}.{secrets.token_hex(4)}"
        staging.mkdir(mode=PRIVATE_DIR)
        try:
            stats = await loop.run_in_executor(self._pool, self.state.download, request.capture, staging)
            saved = await loop.run_in_executor(self._pool, self._adopt, staging, request.sandbox_id)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.transferred.add_fetched("hibernation", stats.fetched_bytes)
        t1 = time.perf_counter()
        record = SandboxRecord(
            saved.id, saved.template, saved.spec, None, "hibernated", saved=saved, created_at=saved.created_at
        )
        manager.table.load(record)
        try:
            await manager.wake(saved.id)
            t2 = time.perf_counter()
            cost = (
                f"woken from {request.capture}: fetch_ms={(t1 - t0) * 1000:.1f} "
                f"restore_ms={(t2 - t1) * 1000:.1f} raw_bytes={stats.raw_bytes} "
                f"fetched_bytes={stats.fetched_bytes}"
            )
            await loop.run_in_executor(self._pool, self._in_db, _confirm, saved.id, lease, cost)
        except BaseException:
            async with record.lock:
                await forget(manager, record)
            if record.runtime is None and await loop.run_in_executor(
                self._pool, self._still_stored, saved.id
            ):
                await self._set_node(saved.id, STORED_NODE, state="hibernated")  # the wake wrote running
            raise
        await self._set_node(saved.id, None)
        await self._as_recorded(record)
        log.info(
            "woke sandbox %s from capture %s: fetch %.2f s, restore %.2f s",
            saved.id,
            request.capture,
            t1 - t0,
            t2 - t1,
        )
        return Woken(t1 - t0, t2 - t1, stats.raw_bytes, stats.fetched_bytes)

    def _adopt(self, staging: Path, sandbox_id: str, kind: str = "hibernation") -> SavedSandbox:
        """The fetched capture as a saved sandbox of this node, published into `hibernated/` (a
        checkpoint: into `checkpoints/`, `sandbox_id` its checkpoint id)."""
        saved = SavedSandbox.load(staging, self.transport)
        if saved.kind != kind or saved.id != sandbox_id:
            raise InvalidArgument(f"the capture holds {saved.kind} {saved.id}, not {kind} {sandbox_id}")
        template = get_template(saved.template.name)
        snapshot = self.snapshots.fetch(template)  # this node's, else the store's: never built here
        if snapshot is None or snapshot.key != saved.snapshot_key:
            raise SnapshotMissing(
                f"this node lacks snapshot {saved.snapshot_key} of template {template.name}, which sandbox "
                f"{sandbox_id} was captured over"
            )
        base = staging / BASE
        if base.read_text() != fingerprint(snapshot.memory):
            raise SnapshotMissing(
                f"this node's snapshot {snapshot.key} of template {template.name} is another build than "
                f"the one sandbox {sandbox_id} was captured over (same inputs, other memory): not here"
            )
        base.unlink()
        layout = self.manager.layout
        _, pinned = pin(snapshot, template, layout.pins)
        for path in staging.iterdir():
            os.chmod(path, PRIVATE_FILE)
        here = dataclasses.replace(saved, template=dataclasses.replace(saved.template, rootfs=pinned.rootfs))
        final = (layout.hibernated if kind == "hibernation" else layout.checkpoints) / sandbox_id
        if final.exists():
            raise Conflict(f"{kind} {sandbox_id} is already on this node")
        return publish(here, final, layout.seal)

    # ---- the databases ----------------------------------------------------------------------------

    def _in_db(
        self, fn: Callable[[Connection, str, Lease, str], None], sandbox_id: str, lease: Lease, arg: str
    ) -> None:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._local.conn = connect(self.url)
        try:
            fn(conn, sandbox_id, lease, arg)
        except psycopg.Error:
            conn.close()
            raise

    async def _as_recorded(self, record: SandboxRecord) -> None:
        """Its owner, labels and lifetime as the shared store has them (as a restarted daemon takes them)."""
        control = self._control
        if control is None:
            return
        try:
            row = await control.db(control.store.get_sandbox, record.id)
        except TartarusError as e:
            log.warning("could not read the record of sandbox %s: %s", record.id, e)
            return
        if row is None:
            return
        record.spec = dataclasses.replace(record.spec, tenant=row.tenant, labels=row.labels)
        if row.expires_at is not None:
            self.manager.set_ttl(record.id, max(0.0, row.expires_at - time.time()))
            record.timeout_s = row.timeout_s

    def _still_stored(self, sandbox_id: str) -> bool:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._local.conn = connect(self.url)
        try:
            return Placer(conn).locate(sandbox_id).stored
        except (TartarusError, psycopg.Error):
            return False

    async def _set_node(self, sandbox_id: str, node: str | None, **fields: str) -> None:
        """The shared store's record follows the sandbox (`None`: this node), so that no daemon's restart
        takes it for its own lost one."""
        control = self._control
        if control is None:
            return
        try:
            await control.db(control.store.update_sandbox, sandbox_id, node=node or control.node, **fields)
        except TartarusError as e:
            log.warning("could not record where sandbox %s is: %s", sandbox_id, e)


def fingerprint(memory: Path) -> str:
    """What identifies a snapshot's build, not only its inputs: the SHA-256 of its memory file's data
    (holes skipped, their places hashed), computed once per file per process. A capture holds only the
    pages its sandbox changed, so it wakes correctly only over the very same memory."""
    st = os.stat(memory)
    key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    found = _fingerprints.get(key)
    if found is None:
        digest = hashlib.sha256()
        with open(memory, "rb") as f:
            for piece in pieces(f):
                if isinstance(piece, Hole):
                    digest.update(b"hole %d;" % piece.size)
                else:
                    digest.update(piece)
        found = _fingerprints[key] = digest.hexdigest()
    return found


def _mark(conn: Connection, sandbox_id: str, lease: Lease, capture: str) -> None:
    Placer(conn).hibernated(sandbox_id, lease.node, lease.epoch, capture)


def _confirm(conn: Connection, sandbox_id: str, lease: Lease, detail: str) -> None:
    Placer(conn).confirm_wake(sandbox_id, lease.node, lease.epoch, detail)


async def forget(manager: SandboxManager, record: SandboxRecord) -> None:
    """Drop a sandbox from this node without ending it (call holding its lock): it lives on elsewhere,
    in the object store or on another node, so nothing is told (its records and placement stay)."""
    if manager.table.find(record.id) is record:
        manager.table.remove(record.id)
    manager.schedulers.forget(record.id)
    await manager.ports.close(record.id)
    runtime, saved = record.runtime, record.saved
    record.runtime, record.saved, record.state = None, None, "moved"
    if runtime is not None:
        try:
            await runtime.destroy()
        except Exception as e:  # its VMM is reaped with the node's leftovers
            log.warning("could not stop the local copy of %s: %s", record.id, e)
    if saved is not None:
        remove_saved(saved.path)
