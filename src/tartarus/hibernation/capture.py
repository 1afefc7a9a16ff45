"""Capture a paused VM's device state and the guest pages it owns into one durable file."""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tartarus.hibernation.dirty import own_pages
from tartarus.hibernation.stream import FilterStats, PageMaps, filter_ram
from tartarus.runtime.qemu import RAM_BLOCK
from tartarus.runtime.vm import MicroVM

log = logging.getLogger(__name__)

WRITE_BUFFER = 1 << 20


@dataclass(frozen=True)
class Capture:
    bytes: int
    pages_kept: int
    pages_dropped: int
    seconds_save: float
    seconds_filter: float


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _filter_to(raw: Path, keep: PageMaps, dest: Path) -> FilterStats:
    with raw.open("rb") as src, dest.open("xb", buffering=WRITE_BUFFER) as out:
        with mmap.mmap(src.fileno(), 0, prot=mmap.PROT_READ) as mm:
            view = memoryview(mm)
            try:
                stats = filter_ram(view, keep, out.write)
            finally:
                view.release()
        out.flush()
        os.fsync(out.fileno())
    return stats


async def capture(vm: MicroVM, memory_file: Path, dest: Path, *, own_pages_only: bool = True) -> Capture:
    """Pause `vm` (it stays paused) and write to `dest` what restoring it over `memory_file` needs.

    QEMU writes the full stream to a scratch file next to `dest`; the pages the guest never wrote are
    then dropped (they are in `memory_file` already). If the page tables cannot be read, every page is
    kept: bigger, never wrong.
    """
    raw = dest.with_name(dest.name + ".raw")
    t0 = time.perf_counter()
    try:
        await vm.save_state(raw)
        t1 = time.perf_counter()
        keep: dict[str, bytes] = {}
        try:
            assert vm.pid is not None
            if own_pages_only:  # (False: the plain QEMU stream, which the benchmarks compare against)
                keep[RAM_BLOCK] = own_pages(vm.pid, memory_file)
        except (OSError, LookupError) as e:
            log.warning("keeping every guest page: cannot read the VMM's page table: %s", e)
        stats = await asyncio.to_thread(_filter_to, raw, keep, dest)
    finally:
        raw.unlink(missing_ok=True)
    return Capture(stats.bytes_out, stats.pages_kept, stats.pages_dropped, t1 - t0, time.perf_counter() - t1)
