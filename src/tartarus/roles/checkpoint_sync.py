"""An agent's side of checkpoints in the object store (issue 16): store one taken here, fetch one taken
anywhere before starting sandboxes from it.

Store: the checkpoint this node just took goes up as a capture (`StateSync`'s upload: content-addressed
chunks, manifest last, the env sealed for transport), then its row goes into `cluster.checkpoints`. Only
then is it a checkpoint of the cluster; the gateway deletes the local one if either step fails.

Fetch: a node asked to start a sandbox from a checkpoint it lacks downloads the capture (every chunk
verified against its SHA-256, all or nothing) and publishes it into its own `checkpoints/` directory,
re-pinned to this node's copy of the same template snapshot. One fetch per checkpoint at a time; a node
that has it (it took it, or fetched it before) fetches nothing.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from dataclasses import dataclass

from tartarus.cluster import checkpoints
from tartarus.cluster.checkpoints import StoredCheckpoint
from tartarus.cluster.model import check_name
from tartarus.errors import Conflict, NotFound
from tartarus.private import PRIVATE_DIR
from tartarus.roles.stored import INCOMING, StateSync


@dataclass(frozen=True)
class Fetched:
    checkpoint_id: str
    fetched_bytes: int  # 0: this node had it already
    raw_bytes: int


class CheckpointSync:
    def __init__(self, sync: StateSync) -> None:
        self.sync = sync
        self._locks: dict[str, asyncio.Lock] = {}

    async def store(self, checkpoint_id: str) -> StoredCheckpoint:
        """Upload this node's checkpoint and record it in the cluster."""
        sync = self.sync
        saved = sync.manager.get_checkpoint(checkpoint_id)
        lease = sync.lease()
        if lease is None:
            raise Conflict("this node holds no lease: it cannot record a checkpoint in the cluster")
        capture = await asyncio.get_running_loop().run_in_executor(sync.pool, sync.upload, saved)
        stored = StoredCheckpoint(
            id=saved.id,
            tenant=saved.spec.tenant,
            sandbox_id=saved.sandbox_id,
            template=saved.template.name,
            node=lease.node,
            capture=capture,
            vcpus=saved.vcpus,
            memory_mib=saved.memory_mib,
            captured_at=saved.captured_at,
            disk_bytes=saved.disk_bytes,
            ttl_s=saved.ttl_s,
        )
        await sync.in_pool(lambda conn: checkpoints.record(conn, stored))
        return stored

    async def fetch(self, checkpoint_id: str, capture: str) -> Fetched:
        """Have the checkpoint in this node's `checkpoints/`, downloading it unless it is there."""
        check_name("checkpoint id", checkpoint_id)
        lock = self._locks.setdefault(checkpoint_id, asyncio.Lock())
        async with lock:
            try:
                self.sync.manager.get_checkpoint(checkpoint_id)
                return Fetched(checkpoint_id, 0, 0)
            except NotFound:
                pass
            return await self._download(checkpoint_id, capture)

    async def _download(self, checkpoint_id: str, capture: str) -> Fetched:
        sync = self.sync
        loop = asyncio.get_running_loop()
        incoming = sync.manager.layout.state_dir / INCOMING
        incoming.mkdir(mode=PRIVATE_DIR, exist_ok=True)
        staging = incoming / f"{checkpoint_id}.{secrets.token_hex(4)}"
        staging.mkdir(mode=PRIVATE_DIR)
        try:
            stats = await loop.run_in_executor(sync.pool, sync.state.download, capture, staging)
            await loop.run_in_executor(sync.pool, sync.adopt, staging, checkpoint_id, "checkpoint")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        sync.transferred.add_fetched("checkpoint", stats.fetched_bytes)
        return Fetched(checkpoint_id, stats.fetched_bytes, stats.raw_bytes)
