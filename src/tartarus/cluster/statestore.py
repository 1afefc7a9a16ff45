"""A capture (a hibernation's or a checkpoint's files) to and from the object store, streamed in chunks.

Upload reads one chunk at a time per worker and keeps at most `window` chunks in flight, so memory stays
bounded by window x chunk size whatever the file size; a chunk already in the store (this capture or an
earlier one) is not sent again. A sparse file's holes are neither read nor fetched: a chunk wholly in a
hole is the (shared) zero chunk, and a zero chunk downloads as a hole. The manifest is written last.
Download fetches chunks in parallel but writes them in order into a staging directory beside the
destination, verifies every chunk's hash, and moves the files into place only when all are complete: a
corrupt or missing chunk leaves nothing half-written at the destination.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from tartarus.cluster.chunks import CHUNK_SIZE, ChunkRef, Hole, pieces, seal, unseal, zero
from tartarus.cluster.manifest import FileEntry, Manifest, check_capture, manifest_key
from tartarus.cluster.objects import ObjectStore
from tartarus.errors import Conflict, InvalidArgument

T = TypeVar("T")
REFRESH_S = 12 * 3600.0  # a deduplicated chunk older than this is written again (see _put_new)


@dataclass(frozen=True)
class UploadStats:
    manifest: Manifest
    chunks: int  # chunk references in the capture
    uploaded: int  # chunks sent (the rest were already stored)
    raw_bytes: int
    sent_bytes: int  # compressed bytes sent


@dataclass(frozen=True)
class DownloadStats:
    manifest: Manifest
    chunks: int
    raw_bytes: int
    fetched_bytes: int


class StateStore:
    def __init__(
        self,
        objects: ObjectStore,
        *,
        chunk_size: int = CHUNK_SIZE,
        workers: int = 4,
        refresh_s: float = REFRESH_S,
    ) -> None:
        if chunk_size <= 0 or workers < 1 or refresh_s <= 0:
            raise InvalidArgument("chunk size, workers and the refresh time must be positive")
        self.objects = objects
        self.refresh_s = refresh_s
        self.chunk_size = chunk_size
        self.workers = workers

    def upload(self, capture: str, files: Sequence[tuple[str, Path]]) -> UploadStats:
        """Store `files` (name in the capture, local path) as capture `capture`; refuses to overwrite."""
        check_capture(capture)
        if self.objects.exists(manifest_key(capture)):
            raise Conflict(f"capture {capture} already exists in the object store")
        entries: list[FileEntry] = []
        uploaded = sent = raw_total = refs = 0
        seen: set[str] = set()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="state-up") as pool:
            window: deque[Future[int]] = deque()
            for name, path in files:
                chunks: list[ChunkRef] = []
                with open(path, "rb") as f:
                    for raw in pieces(f, self.chunk_size):
                        sealed = zero(raw.size) if isinstance(raw, Hole) else seal(raw)
                        chunks.append(sealed.ref)
                        raw_total += sealed.ref.size
                        refs += 1
                        if sealed.ref.digest in seen:
                            continue
                        seen.add(sealed.ref.digest)
                        window.append(pool.submit(self._put_new, sealed.ref, sealed.blob))
                        while len(window) >= self.workers * 2:
                            sent_now = window.popleft().result()
                            uploaded += sent_now > 0
                            sent += sent_now
                entries.append(FileEntry(name, sum(c.size for c in chunks), tuple(chunks)))
            while window:
                sent_now = window.popleft().result()
                uploaded += sent_now > 0
                sent += sent_now
        manifest = Manifest(capture, self.chunk_size, tuple(entries))
        self.objects.put(manifest_key(capture), manifest.to_bytes())
        return UploadStats(manifest, refs, uploaded, raw_total, sent)

    def _put_new(self, ref: ChunkRef, blob: bytes) -> int:
        """Send a chunk unless the store has it, written less than `refresh_s` ago; the bytes sent (0
        when deduplicated). An older one is written again: collection (`cluster.collect`) deletes only
        chunks no manifest names that are older than its grace period (at least twice `refresh_s`), so
        one this upload counts on cannot go before its manifest is written."""
        at = self.objects.modified(ref.key)
        if at is not None and (datetime.now(UTC) - at).total_seconds() < self.refresh_s:
            return 0
        self.objects.put(ref.key, blob)
        return len(blob)

    def manifest(self, capture: str) -> Manifest:
        return Manifest.parse(self.objects.get(manifest_key(capture)))

    def download(self, capture: str, dest: Path) -> DownloadStats:
        """Write the capture's files into directory `dest`, all or nothing."""
        manifest = self.manifest(capture)
        dest.mkdir(parents=True, exist_ok=True)
        clashes = [f.name for f in manifest.files if (dest / f.name).exists()]
        if clashes:
            raise Conflict(f"{dest} already has {', '.join(clashes)}: not overwriting")
        staging = Path(tempfile.mkdtemp(prefix=f".{capture}.partial-", dir=dest))
        fetched = 0
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="state-down") as pool:
                for entry in manifest.files:
                    with open(staging / entry.name, "wb") as out:
                        for blob_size, raw in _ordered(pool, self._fetch, entry.chunks, self.workers * 2):
                            if isinstance(raw, Hole):
                                out.seek(raw.size, os.SEEK_CUR)  # left a hole: the copy stays sparse
                            else:
                                out.write(raw)
                            fetched += blob_size
                        out.truncate(entry.size)
                        out.flush()
                        os.fsync(out.fileno())
            for entry in manifest.files:
                os.replace(staging / entry.name, dest / entry.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return DownloadStats(
            manifest, sum(len(f.chunks) for f in manifest.files), sum(f.size for f in manifest.files), fetched
        )

    def _fetch(self, ref: ChunkRef) -> tuple[int, bytes | Hole]:
        if ref == zero(ref.size).ref:
            return 0, Hole(ref.size)  # zeros: nothing to fetch
        blob = self.objects.get(ref.key)
        return len(blob), unseal(ref, blob)


def _ordered(
    pool: ThreadPoolExecutor, fn: Callable[[ChunkRef], T], refs: Sequence[ChunkRef], window: int
) -> Iterator[T]:
    """fn over refs on the pool, at most `window` in flight, results in order (bounded memory)."""
    pending: deque[Future[T]] = deque()
    try:
        for ref in refs:
            pending.append(pool.submit(fn, ref))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
