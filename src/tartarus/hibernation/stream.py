"""Keep only a sandbox's own pages in a QEMU migration stream.

A restored sandbox maps its template's memory file privately, so its RAM block is not "shared" and
`x-ignore-shared` cannot leave it out: QEMU writes every non-zero page. Most of them are the template's,
untouched. This filter rewrites the stream, dropping the records of pages the sandbox never wrote; a
VMM that maps the same template file and loads the result ends up with the same RAM.

Only the RAM sections are parsed (their record format is simple and stable: QEMU's migration/ram.c); the
device sections after them are copied byte for byte. Anything unexpected is an error, never a guess.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

MAGIC = b"QEVM"
VERSION = 3

# savevm.c section types
EOF_ = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SUBSECTION = 0x05
CONFIGURATION = 0x07
SECTION_FOOTER = 0x7E

# ram.c record flags, in the low bits of each record's offset
FLAG_ZERO = 0x02
FLAG_MEM_SIZE = 0x04
FLAG_PAGE = 0x08
FLAG_EOS = 0x10
FLAG_CONTINUE = 0x20
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
FLAG_MASK = PAGE_SIZE - 1


class StreamError(Exception):
    """The stream is not one this filter understands; the caller keeps the unfiltered stream."""


@dataclass
class FilterStats:
    pages_kept: int = 0
    pages_dropped: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


# Per RAM block, one entry per page: nonzero to keep that page's record. Blocks not named keep all pages.
PageMaps = Mapping[str, Sequence[int]]


class _Reader:
    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.data):
            raise StreamError(f"stream ends inside a record at byte {self.pos}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def be32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def be64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def name(self) -> str:
        return bytes(self.take(self.u8())).decode("ascii", "replace")


def _skip_configuration(r: _Reader) -> None:
    r.take(r.be32())  # machine type name
    while r.pos < len(r.data) and r.data[r.pos] == SUBSECTION:
        r.u8()
        name = r.name()
        r.be32()  # version
        if name == "configuration/capabilities":
            for _ in range(r.be32()):
                r.name()
        elif name == "configuration/target-page-bits":
            r.be32()
        else:
            raise StreamError(f"unknown configuration subsection {name!r}")


def filter_ram(data: memoryview, keep: PageMaps, out: Callable[[bytes | memoryview], object]) -> FilterStats:
    """Write `data` to `out` without the RAM page records that `keep` marks 0."""
    r = _Reader(data)
    stats = FilterStats(bytes_in=len(data))

    def emit(chunk: bytes | memoryview) -> None:
        stats.bytes_out += len(chunk)
        out(chunk)

    if bytes(r.take(4)) != MAGIC or r.be32() != VERSION:
        raise StreamError("not a QEMU migration stream (version 3)")
    if r.data[r.pos] == CONFIGURATION:
        r.u8()
        _skip_configuration(r)
    emit(data[: r.pos])
    ram_section: int | None = None
    blocks = _Blocks()
    while True:
        start = r.pos
        kind = r.u8()
        if kind in (SECTION_START, SECTION_FULL):
            section = r.be32()
            idstr = r.name()
            r.be32()  # instance
            r.be32()  # version
            if kind == SECTION_FULL:
                emit(data[start:])  # device state: copied as it is, to the end
                return stats
            if idstr != "ram":
                raise StreamError(f"unsupported iterative section {idstr!r}")
            ram_section = section
            emit(data[start : r.pos])
            _copy_setup(r, data, emit)
        elif kind in (SECTION_PART, SECTION_END):
            if r.be32() != ram_section:
                raise StreamError(f"section part at byte {start} is not the RAM section")
            emit(data[start : r.pos])
            _filter_pages(r, data, keep, emit, stats, blocks)
        elif kind == EOF_:
            emit(data[start:])
            return stats
        else:
            raise StreamError(f"unexpected section type 0x{kind:02x} at byte {start}")
        footer = r.pos
        if r.u8() != SECTION_FOOTER:
            raise StreamError(f"missing section footer at byte {footer}")
        r.be32()
        emit(data[footer : r.pos])


@dataclass
class _Blocks:
    """A record flagged CONTINUE means "same block as the last record", across sections too."""

    read: str = ""  # block of the last record read
    written: str = ""  # block the loader last saw named: a kept record after dropped ones may rename it


def _copy_setup(r: _Reader, data: memoryview, emit: Callable[[memoryview], None]) -> None:
    """The RAM setup record: block names and sizes (and addresses, with x-ignore-shared)."""
    start = r.pos
    header = r.be64()
    if not header & FLAG_MEM_SIZE:
        raise StreamError("RAM section does not start with the block list")
    total = header & ~FLAG_MASK
    while total > 0:
        r.name()
        total -= r.be64()
        r.be64()  # guest address: present because save and load both set x-ignore-shared
    if r.be64() != FLAG_EOS:
        raise StreamError("RAM block list not terminated")
    emit(data[start : r.pos])


def _filter_pages(
    r: _Reader,
    data: memoryview,
    keep: PageMaps,
    emit: Callable[[bytes | memoryview], None],
    stats: FilterStats,
    blocks: _Blocks,
) -> None:
    # The hot loop of a hibernation (one pass per guest page): plain locals, no helper calls.
    pos, size, unpack = r.pos, len(data), struct.Struct(">Q").unpack_from
    block = blocks.read
    pagemap = keep.get(block)
    kept = dropped = 0
    try:
        while True:
            start = pos
            if pos + 8 > size:
                raise StreamError(f"stream ends inside a record at byte {pos}")
            (word,) = unpack(data, pos)
            pos += 8
            flags = word & FLAG_MASK
            if flags & FLAG_EOS:
                emit(data[start:pos])
                return
            if not flags & FLAG_CONTINUE:
                n = data[pos]
                blocks.read = bytes(data[pos + 1 : pos + 1 + n]).decode("ascii", "replace")
                pos += 1 + n
                block = blocks.read
                pagemap = keep.get(block)
            if flags & FLAG_ZERO:
                end = pos + 1
            elif flags & FLAG_PAGE:
                end = pos + PAGE_SIZE
            else:
                raise StreamError(f"unsupported RAM record flags 0x{flags:x} at byte {start}")
            if end > size:
                raise StreamError(f"stream ends inside a record at byte {start}")
            offset = word & ~FLAG_MASK
            if pagemap is not None and not pagemap[offset >> PAGE_SHIFT]:
                dropped += 1
            else:
                kept += 1
                if block == blocks.written:
                    emit(struct.pack(">Q", offset | flags | FLAG_CONTINUE))
                else:
                    name = block.encode()
                    emit(struct.pack(">QB", offset | (flags & ~FLAG_CONTINUE), len(name)) + name)
                    blocks.written = block
                emit(data[pos:end])
            pos = end
    finally:
        r.pos = pos
        stats.pages_kept += kept
        stats.pages_dropped += dropped
