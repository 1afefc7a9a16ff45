"""Which guest pages a sandbox wrote, read from its VMM's page tables.

A sandbox's RAM is a private mapping of the template's memory file. A page the guest never wrote is
still backed by that file; the first write gives it an anonymous copy. /proc/PID/pagemap tells the two
apart (bit 61 "file page or shared anon", bit 62 swapped, bit 63 present), so the pages a sandbox owns
are exactly the present-and-anonymous or swapped ones. The kernel keeps this exact; no guest
cooperation and no dirty logging in QEMU is needed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tartarus.hibernation.stream import PAGE_SIZE

# Indexed by pagemap entry >> 61 (present, swapped, file): 1 where the page is the process's own.
_OWN = bytes([0, 0, 1, 1, 1, 0, 1, 1])
# The same, indexed by an entry's top byte (bits 5-7 of it), which is every 8th byte from `_TOP`.
_OWN_BY_TOP_BYTE = bytes(_OWN[b >> 5] for b in range(256))
_TOP = 7 if sys.byteorder == "little" else 0


def ram_mapping(pid: int, memory_file: Path) -> tuple[int, int]:
    """(start, length) of the VMM's mapping of `memory_file`, the guest RAM block."""
    target = str(memory_file)
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target and fields[2] == "00000000":
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            return lo, hi - lo
    raise LookupError(f"process {pid} does not map {memory_file}")


def own_pages(pid: int, memory_file: Path) -> bytes:
    """One byte per guest page of the RAM block: 1 if the sandbox wrote it (holds its own copy)."""
    return own_pages_at(pid, *ram_mapping(pid, memory_file))


def own_pages_at(pid: int, start: int, length: int) -> bytes:
    """`own_pages` of the mapping at `start`: a byte-string translation, no Python loop per page."""
    pages = length // PAGE_SIZE
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = os.pread(fd, pages * 8, start // PAGE_SIZE * 8)
    finally:
        os.close(fd)
    if len(raw) != pages * 8:
        raise OSError(f"short pagemap read for process {pid}")
    return raw[_TOP::8].translate(_OWN_BY_TOP_BYTE)
