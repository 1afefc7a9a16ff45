"""The memory of a captured sandbox on disk (`memory.state`), format 2: its own pages, page-aligned.

    [header, one page] [the pages the sandbox owns, packed in guest order] [device state] [runs]

The device state is a QEMU migration stream without the guest's own pages (the template snapshot's
RAM sections, then QEMU's device sections), which a VMM waiting for incoming state loads as it
loads a snapshot; the pages are copied into that VMM's RAM by the host (`remote.write`), the runs
(first page, page count) saying where each goes. The pages are page-aligned so that a hibernation
writes them with O_DIRECT, straight from where it read them, and a wake maps them.

Format 1 is a plain (filtered) QEMU stream, which begins with QEMU's magic; a VMM loads it as it is.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import struct
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tartarus.hibernation import remote
from tartarus.hibernation.stream import MAGIC as QEMU_MAGIC
from tartarus.hibernation.stream import PAGE_SIZE

MAGIC = b"TTHB"
VERSION = 2
_HEADER = struct.Struct(
    ">4sIIQQQQQ"
)  # magic, version, page size, pages at, pages, device at, its length, runs
CHUNK = 4 << 20  # bytes read from the VMM and written per system call
LOAD_THREADS = 2
# Ends the device stream: QEMU's loader reads a JSON description of the devices after the EOF section
# and complains (without failing) if there is none; the empty object satisfies it.
VMDESC = b"\x06" + struct.pack(">I", 2) + b"{}"

Run = tuple[int, int]  # (first guest page, pages)


class ImageError(Exception):
    """A memory.state this Tartarus cannot load."""


@dataclass(frozen=True)
class Image:
    pages_at: int
    pages: int
    device_at: int
    device_len: int
    runs: tuple[Run, ...]


def runs_of(own: bytes) -> list[Run]:
    """The runs of consecutive owned pages in a page map (one byte per page, 1 = owned)."""
    return [(m.start(), m.end() - m.start()) for m in re.finditer(b"\x01+", own)]


def read_header(path: Path) -> Image | None:
    """The layout of a format-2 `memory.state`; None for format 1 (a QEMU stream)."""
    with open(path, "rb") as f:
        head = f.read(PAGE_SIZE)
        if head[:4] == QEMU_MAGIC:
            return None
        if len(head) < _HEADER.size or head[:4] != MAGIC:
            raise ImageError(f"{path} is not a saved sandbox's memory (unknown format)")
        _, version, page_size, pages_at, pages, device_at, device_len, nruns = _HEADER.unpack_from(head)
        if version != VERSION or page_size != PAGE_SIZE:
            raise ImageError(
                f"{path} is saved-memory format {version} (page size {page_size}); this Tartarus reads "
                f"formats 1 and {VERSION} ({PAGE_SIZE}-byte pages)"
            )
        f.seek(device_at + device_len)
        raw = f.read(8 * nruns)
    if len(raw) != 8 * nruns:
        raise ImageError(f"{path} is truncated")
    flat = struct.unpack(f">{2 * nruns}I", raw)
    runs = tuple(zip(flat[::2], flat[1::2], strict=True))
    if sum(n for _, n in runs) != pages:
        raise ImageError(f"{path}: its page runs do not add up to its page count")
    return Image(pages_at, pages, device_at, device_len, runs)


def _open_direct(path: Path) -> int:
    """`path` created for writing, with O_DIRECT where the filesystem has it (not tmpfs): the pages go
    to disk without a copy into the page cache, and the final fdatasync has little left to do."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_DIRECT, 0o600)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        # (tmpfs creates the file before it refuses O_DIRECT)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _copy_pages(fd: int, pid: int, spans: Sequence[remote.Span], offset: int) -> None:
    """Read `spans` of process `pid` into two page-aligned buffers (as O_DIRECT wants) in turn, each
    written by a second thread while the next is read: the disk, the slower, never waits for a read.
    The buffers are not closed on an error (a full disk): a failed write's frame still holds a view of
    one, and closing would raise over the real cause; they are freed with it."""
    buffers = [mmap.mmap(-1, CHUNK) for _ in range(2)]
    views = [memoryview(b) for b in buffers]
    addresses = [remote.address_of(b) for b in buffers]
    with ThreadPoolExecutor(1, thread_name_prefix="hibernate-write") as writer:
        pending: Future[None] | None = None
        for i, batch in enumerate(remote.batches(spans, CHUNK)):
            size = sum(length for _, length in batch)
            remote.read(pid, [(addresses[i % 2], size)], batch)  # its buffer's last write was waited for
            if pending is not None:
                pending.result()
            pending = writer.submit(_pwrite_all, fd, views[i % 2][:size], offset)
            offset += size
        if pending is not None:
            pending.result()
    for view, buffer in zip(views, buffers, strict=True):
        view.release()
        buffer.close()


def write(dest: Path, pid: int, ram_start: int, runs: Sequence[Run], device: bytes) -> int:
    """Write the image: `runs` of pages read from process `pid`'s RAM mapping at `ram_start`, then
    `device`. Durable (fdatasync) when this returns; the bytes written."""
    pages = sum(n for _, n in runs)
    pages_at = PAGE_SIZE
    device_at = pages_at + pages * PAGE_SIZE
    spans = [(ram_start + first * PAGE_SIZE, n * PAGE_SIZE) for first, n in runs]
    fd = _open_direct(dest)
    try:
        _copy_pages(fd, pid, spans, pages_at)
        flat = [x for run in runs for x in run]
        tail = device + struct.pack(f">{len(flat)}I", *flat)
        head = _HEADER.pack(MAGIC, VERSION, PAGE_SIZE, pages_at, pages, device_at, len(device), len(runs))
        with open(dest, "r+b", buffering=0) as plain:  # small and unaligned: through the page cache
            _pwrite_all(plain.fileno(), tail, device_at)
            _pwrite_all(plain.fileno(), head, 0)
        os.fdatasync(fd)
        return device_at + len(tail)
    finally:
        os.close(fd)


def load_pages(path: Path, image: Image, pid: int, ram_start: int) -> None:
    """Copy the image's pages into process `pid`'s RAM mapping at `ram_start` (a VMM whose guest has not
    run): the file mapped (read ahead at once), `LOAD_THREADS` threads each copying 4 MiB per system
    call. The cost is the VMM's side: each page it receives is a copy-on-write fault of its private
    mapping of the template, which threads take in parallel."""
    if not image.pages:
        return
    spans = [(ram_start + first * PAGE_SIZE, n * PAGE_SIZE) for first, n in image.runs]
    with open(path, "rb") as f:
        mapped = mmap.mmap(
            f.fileno(), image.pages * PAGE_SIZE, offset=image.pages_at, access=mmap.ACCESS_COPY
        )
    try:
        mapped.madvise(mmap.MADV_WILLNEED)
        address = remote.address_of(mapped)
        jobs: list[tuple[int, list[remote.Span]]] = []
        offset = 0
        for batch in remote.batches(spans, CHUNK):
            jobs.append((address + offset, batch))
            offset += sum(length for _, length in batch)

        def copy(job: tuple[int, list[remote.Span]]) -> None:
            local, batch = job
            remote.write(pid, [(local, sum(length for _, length in batch))], batch)

        with ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="wake-load") as pool:
            list(pool.map(copy, jobs))
    finally:
        mapped.close()
