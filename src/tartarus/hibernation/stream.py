"""Keep only a sandbox's own pages in a QEMU migration stream.

A restored sandbox maps its template's memory file privately, so its RAM block is not "shared" and
`x-ignore-shared` cannot leave it out: QEMU writes every non-zero page. Most of them are the template's,
untouched. This filter rewrites the stream, dropping the records of pages the sandbox never wrote; a
VMM that maps the same template file and loads the result ends up with the same RAM.

Only the RAM sections are parsed (their record format is simple and stable: QEMU's migration/ram.c); the
device sections after them are copied byte for byte, and so are command sections (self-delimiting,
addressed to the destination, which is the VMM that loads the result). Anything else unexpected is an
error, never a guess.
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
COMMAND = 0x08  # a command to the destination (QEMU 10 sends one at switchover); no footer
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
Read = Callable[[int], bytes]  # like os.read on a pipe: up to n bytes, b"" at the end
Write = Callable[[bytes], object]

CHUNK = 1 << 20
# The longest page record: header, block name (1 + up to 255 bytes), a page.
MAX_RECORD = 8 + 256 + PAGE_SIZE


class _Source:
    """The stream as it arrives (from a pipe: QEMU writes while this reads), held from `mark` on.

    `pos` is the read position in `buf`; bytes before `mark` may be dropped when more is read, so a
    parser marks where the bytes it will copy out begin.
    """

    def __init__(self, read: Read) -> None:
        self.read = read
        self.buf = bytearray()
        self.pos = 0
        self.mark = 0
        self.eof = False
        self.offset = 0  # of buf[0] in the stream, for error messages
        self.total = 0

    def fill(self, n: int) -> bool:
        """Make `n` bytes available at `pos` if the stream has them."""
        if self.pos + n <= len(self.buf):
            return True
        if self.mark:
            del self.buf[: self.mark]
            self.offset += self.mark
            self.pos -= self.mark
            self.mark = 0
        while self.pos + n > len(self.buf) and not self.eof:
            chunk = self.read(CHUNK)
            self.total += len(chunk)
            if chunk:
                self.buf += chunk
            else:
                self.eof = True
        return self.pos + n <= len(self.buf)

    def take(self, n: int) -> bytes:
        if not self.fill(n):
            raise StreamError(f"stream ends inside a record at byte {self.offset + self.pos}")
        chunk = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return chunk

    def peek(self) -> int | None:
        return self.buf[self.pos] if self.fill(1) else None

    def u8(self) -> int:
        return self.take(1)[0]

    def be16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def be32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def be64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def name(self) -> str:
        return self.take(self.u8()).decode("ascii", "replace")

    def marked(self) -> bytes:
        """The bytes from the mark to here; the mark moves here."""
        chunk = bytes(self.buf[self.mark : self.pos])
        self.mark = self.pos
        return chunk

    def rest(self, emit: Callable[[bytes], None]) -> None:
        """Everything left in the stream, as it is."""
        emit(bytes(self.buf[self.mark :]))
        self.buf.clear()
        self.pos = self.mark = 0
        while chunk := self.read(CHUNK):
            self.total += len(chunk)
            emit(chunk)


def _skip_configuration(r: _Source) -> None:
    r.take(r.be32())  # machine type name
    while r.peek() == SUBSECTION:
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


def filter_ram(read: Read, keep: PageMaps, out: Write) -> FilterStats:
    """Copy the stream from `read` to `out` without the RAM page records that `keep` marks 0."""
    r = _Source(read)
    stats = FilterStats()

    def emit(chunk: bytes) -> None:
        stats.bytes_out += len(chunk)
        out(chunk)

    if r.take(4) != MAGIC or r.be32() != VERSION:
        raise StreamError("not a QEMU migration stream (version 3)")
    if r.peek() == CONFIGURATION:
        r.u8()
        _skip_configuration(r)
    emit(r.marked())
    ram_section: int | None = None
    blocks = _Blocks()
    while True:
        start = r.offset + r.pos
        kind = r.u8()
        if kind in (SECTION_START, SECTION_FULL):
            section = r.be32()
            idstr = r.name()
            r.be32()  # instance
            r.be32()  # version
            if kind == SECTION_FULL:
                break  # device state from here on: copied as it is, to the end
            if idstr != "ram":
                raise StreamError(f"unsupported iterative section {idstr!r}")
            ram_section = section
            _skip_setup(r)
            emit(r.marked())
        elif kind in (SECTION_PART, SECTION_END):
            if r.be32() != ram_section:
                raise StreamError(f"section part at byte {start} is not the RAM section")
            emit(r.marked())
            _filter_pages(r, keep, emit, stats, blocks)
        elif kind == COMMAND:
            r.be16()  # the command
            r.take(r.be16())  # its data
            emit(r.marked())
            continue
        elif kind == EOF_:
            break
        else:
            raise StreamError(f"unexpected section type 0x{kind:02x} at byte {start}")
        footer = r.offset + r.pos
        if r.u8() != SECTION_FOOTER:
            raise StreamError(f"missing section footer at byte {footer}")
        r.be32()
        emit(r.marked())
    r.rest(emit)
    stats.bytes_in = r.total
    return stats


@dataclass
class _Blocks:
    """A record flagged CONTINUE means "same block as the last record", across sections too."""

    read: str = ""  # block of the last record read
    written: str = ""  # block the loader last saw named: a kept record after dropped ones may rename it


def _skip_setup(r: _Source) -> None:
    """The RAM setup record: block names and sizes (and addresses, with x-ignore-shared)."""
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


def _filter_pages(
    r: _Source, keep: PageMaps, emit: Callable[[bytes], None], stats: FilterStats, blocks: _Blocks
) -> None:
    # The hot loop of a hibernation (one pass per guest page): plain locals, no helper calls; the
    # buffer is refilled only when a whole record might not be in it.
    unpack = struct.Struct(">Q").unpack_from
    buf, pos, size = r.buf, r.pos, len(r.buf)
    block = blocks.read
    pagemap = keep.get(block)
    kept = dropped = 0
    try:
        while True:
            if pos + MAX_RECORD > size and not r.eof:
                r.pos = r.mark = pos
                r.fill(MAX_RECORD)
                buf, pos, size = r.buf, r.pos, len(r.buf)
            start = pos
            if pos + 8 > size:
                raise StreamError(f"stream ends inside a record at byte {r.offset + pos}")
            (word,) = unpack(buf, pos)
            pos += 8
            flags = word & FLAG_MASK
            if flags & FLAG_EOS:
                emit(bytes(buf[start:pos]))
                return
            if not flags & FLAG_CONTINUE:
                if pos >= size or pos + 1 + buf[pos] > size:
                    raise StreamError(f"stream ends inside a record at byte {r.offset + start}")
                n = buf[pos]
                blocks.read = bytes(buf[pos + 1 : pos + 1 + n]).decode("ascii", "replace")
                pos += 1 + n
                block = blocks.read
                pagemap = keep.get(block)
            if flags & FLAG_ZERO:
                end = pos + 1
            elif flags & FLAG_PAGE:
                end = pos + PAGE_SIZE
            else:
                raise StreamError(f"unsupported RAM record flags 0x{flags:x} at byte {r.offset + start}")
            if end > size:
                raise StreamError(f"stream ends inside a record at byte {r.offset + start}")
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
                emit(bytes(buf[pos:end]))
            pos = end
    finally:
        r.pos = r.mark = pos
        stats.pages_kept += kept
        stats.pages_dropped += dropped


def ram_prefix(stream: bytes) -> bytes:
    """The part of a migration stream before its device state: header, configuration and RAM sections.

    A template snapshot's stream holds no page of its shared RAM block, only the block list and the
    small blocks (the BIOS ROM); followed by a sandbox's device state it is a stream a restoring VMM
    loads, the sandbox's own pages then copied in by the host (`tartarus.hibernation.image`)."""
    chunks = [stream]
    r = _Source(lambda n: chunks.pop() if chunks else b"")
    if r.take(4) != MAGIC or r.be32() != VERSION:
        raise StreamError("not a QEMU migration stream (version 3)")
    if r.peek() == CONFIGURATION:
        r.u8()
        _skip_configuration(r)
    ram_section: int | None = None
    blocks = _Blocks()
    while True:
        start = r.offset + r.pos
        kind = r.u8()
        if kind == SECTION_START:
            ram_section = r.be32()
            if r.name() != "ram":
                raise StreamError("unsupported iterative section")
            r.take(8)  # instance, version
            _skip_setup(r)
        elif kind in (SECTION_PART, SECTION_END):
            if r.be32() != ram_section:
                raise StreamError(f"section part at byte {start} is not the RAM section")
            _filter_pages(r, {}, lambda _: None, FilterStats(), blocks)
        elif kind == SECTION_FULL and ram_section is not None:
            return stream[:start]
        else:
            raise StreamError(f"unexpected section type 0x{kind:02x} at byte {start} before the device state")
        if r.u8() != SECTION_FOOTER:
            raise StreamError("missing section footer")
        r.be32()
