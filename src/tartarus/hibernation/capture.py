"""Capture a paused VM's device state and the guest pages it owns into one durable file."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import select
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tartarus.hibernation import image, lazy
from tartarus.hibernation.dirty import own_pages, own_pages_at, ram_mapping
from tartarus.hibernation.stream import PAGE_SIZE, FilterStats, PageMaps, StreamError, filter_ram, ram_prefix
from tartarus.private import opener
from tartarus.runtime.qemu import RAM_BLOCK
from tartarus.runtime.vm import MicroVM

log = logging.getLogger(__name__)

WRITE_BUFFER = 1 << 20
PIPE_SIZE = 1 << 20
POLL_MS = 100


@dataclass(frozen=True)
class Capture:
    bytes: int
    pages_kept: int
    pages_dropped: int
    seconds_save: float  # pause until QEMU finished writing its stream
    seconds_total: float  # until the kept part is on disk


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Pipe:
    """The read end of QEMU's stream. Reads wait in short polls so that `stop()` can end a reader whose
    writer will never write or close (a migration that hangs)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.stopped = threading.Event()

    def read(self, n: int) -> bytes:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLHUP)
        while not poller.poll(POLL_MS):
            if self.stopped.is_set():
                raise StreamError("the migration stream stopped arriving")
        return os.read(self.fd, n)

    def stop(self) -> None:
        self.stopped.set()


def _filter_to(pipe: _Pipe, keep: PageMaps, dest: Path) -> FilterStats:
    """Read QEMU's stream from the pipe as it is written, keep what `keep` says, fsync the result."""
    try:
        with open(dest, "xb", buffering=WRITE_BUFFER, opener=opener) as out:
            stats = filter_ram(pipe.read, keep, out.write)
            out.flush()
            os.fsync(out.fileno())
        return stats
    finally:
        os.close(pipe.fd)  # a filter that failed early makes QEMU's writes fail instead of blocking


def snapshot_prefix(state: Path) -> bytes | None:
    """What a format-2 capture puts before the device state: the snapshot stream's header and RAM
    sections (`stream.ram_prefix`); None, and the format-1 path, if the snapshot's stream is gone
    (a pin made before pins kept it) or unreadable."""
    try:
        return ram_prefix(state.read_bytes())
    except (OSError, StreamError) as e:
        log.warning("capturing through QEMU's stream: no snapshot stream to build on: %s", e)
        return None


async def capture(
    vm: MicroVM,
    memory_file: Path,
    dest: Path,
    *,
    prefix: bytes | None = None,
    own_pages_only: bool = True,
) -> Capture:
    """Pause `vm` (it stays paused) and write to `dest` what restoring it over `memory_file` needs.

    With `prefix` (the template snapshot's stream up to its device state, `stream.ram_prefix`): the
    pages the guest wrote, read straight from the VMM, and QEMU's device state alone
    (`tartarus.hibernation.image`, format 2). Without it, or if the VMM's memory cannot be read, the
    format-1 path: QEMU's full stream through a filter (`_capture_stream`).
    """
    if prefix is not None and own_pages_only and vm.pid is not None:
        try:
            return await _capture_direct(vm, memory_file, dest, prefix)
        except PermissionError as e:  # not allowed to read the VMM's memory: the stream has the pages
            dest.unlink(missing_ok=True)
            log.warning("capturing through QEMU's stream: cannot read the VMM's memory: %s", e)
    return await _capture_stream(vm, memory_file, dest, own_pages_only=own_pages_only)


async def _capture_direct(vm: MicroVM, memory_file: Path, dest: Path, prefix: bytes) -> Capture:
    """Format 2: pause, note which pages the guest owns (its VMM's page table), have QEMU write the
    device state without RAM (tens of KB), copy the owned pages from the VMM's memory to `dest` with
    O_DIRECT, one fdatasync. No guest page passes through Python or through QEMU's stream."""
    t0 = time.perf_counter()
    await vm.pause()
    assert vm.pid is not None
    start, length = ram_mapping(vm.pid, memory_file)
    runs = image.runs_of(lazy.with_base(own_pages_at(vm.pid, start, length), memory_file))
    device = await vm.save_device_state()
    if device[:8] != prefix[:8]:
        raise StreamError("QEMU's device state is not a migration stream of the snapshot's version")
    stream = prefix + device[8:] + image.VMDESC
    saved = time.perf_counter() - t0
    try:
        size = await asyncio.to_thread(image.write, dest, vm.pid, start, runs, stream)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    kept = sum(n for _, n in runs)
    return Capture(size, kept, length // PAGE_SIZE - kept, saved, time.perf_counter() - t0)


async def _capture_stream(
    vm: MicroVM, memory_file: Path, dest: Path, *, own_pages_only: bool = True
) -> Capture:
    """Format 1: QEMU writes its full stream into a pipe; a thread drops, as the stream goes by, the
    pages the guest never wrote (they are in `memory_file` already). If the page tables cannot be
    read, every page is kept: bigger, never wrong."""
    t0 = time.perf_counter()
    await vm.pause()
    keep: dict[str, bytes] = {}
    try:
        assert vm.pid is not None
        if own_pages_only:  # (False: the plain QEMU stream, which the benchmarks compare against)
            keep[RAM_BLOCK] = lazy.with_base(own_pages(vm.pid, memory_file), memory_file)
    except (OSError, LookupError) as e:
        log.warning("keeping every guest page: cannot read the VMM's page table: %s", e)
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    pipe = _Pipe(rfd)
    reader = asyncio.ensure_future(asyncio.to_thread(_filter_to, pipe, keep, dest))
    try:
        try:
            await vm.save_state_to(wfd)
        finally:
            os.close(wfd)  # QEMU has its own copy until the migration ends; the reader then sees EOF
        saved = time.perf_counter() - t0
        stats = await reader
    except BaseException as error:
        stopped = not reader.done()
        if stopped:  # QEMU failed (or we gave up on it) first: end its stream, then the reader
            with contextlib.suppress(Exception):
                await vm.qmp_execute("migrate_cancel")
            pipe.stop()
        try:
            await reader
        except Exception as cause:
            if not (stopped and isinstance(cause, StreamError)):
                raise cause from error  # the reader failed first (a full disk): why QEMU's writes failed
        finally:
            dest.unlink(missing_ok=True)
        raise
    return Capture(stats.bytes_out, stats.pages_kept, stats.pages_dropped, saved, time.perf_counter() - t0)
