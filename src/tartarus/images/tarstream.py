"""A streaming tar reader made for layer application: one pass, forward only, bounded memory.

Why not `tarfile`: in stream mode it spends ~1.1 s parsing the python image's 8,376 headers and reading
its 253 MB in 10 KB steps — most of a cold conversion. This reader parses a header with one `struct`
call, buffers in 1 MiB steps, and keeps xattr values as the exact bytes PAX carries. It reads what image
layers contain: ustar, GNU (`L`/`K` long names, base-256 numbers, old `S` sparse files) and PAX (`x`, `g`,
`SCHILY.xattr.*`, `LIBARCHIVE.xattr.*`, GNU sparse 0.0, 0.1 and 1.0). A test checks it against `tarfile`.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import BinaryIO

BLOCK = 512
_CHUNK = 1 << 20
_HEADER = struct.Struct("100s8s8s8s12s12s8s1s100s6s2s32s32s8s8s155s12s")
_MAX_META = 16 << 20  # a PAX or GNU long-name record larger than this is not a real layer

REGULAR = (b"0", b"\0", b"7")
DIRECTORY, SYMLINK, HARDLINK = b"5", b"2", b"1"
CHAR, BLOCKDEV, FIFO = b"3", b"4", b"6"
_HEADER_ONLY = (DIRECTORY, SYMLINK, HARDLINK, CHAR, BLOCKDEV, FIFO)


class TarError(Exception):
    """The stream is not a well-formed tar archive."""


@dataclass(slots=True)
class Member:
    name: str
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int  # apparent size of a regular file (sparse files included)
    mtime_ns: int
    atime_ns: int | None = None
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    sparse: list[tuple[int, int]] | None = None  # data regions (offset, length) of a sparse file
    data_size: int = 0  # bytes of data following the header in the archive

    def isreg(self) -> bool:
        return self.type in REGULAR

    def isdir(self) -> bool:
        return self.type == DIRECTORY

    def issym(self) -> bool:
        return self.type == SYMLINK

    def islnk(self) -> bool:
        return self.type == HARDLINK


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _cstr(raw: bytes) -> bytes:
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def _number(raw: bytes) -> int:
    """Octal, or GNU base-256 (first byte 0x80 positive, 0xff negative)."""
    if raw and raw[0] in (0x80, 0xFF):
        value = int.from_bytes(raw[1:], "big")
        return value - (1 << (8 * (len(raw) - 1))) if raw[0] == 0xFF else value
    text = _cstr(raw).strip(b" \0")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarError(f"invalid number field {raw!r}") from None


def _time_ns(text: str) -> int:
    try:
        return int(Decimal(text) * 1_000_000_000)
    except (InvalidOperation, ValueError):
        raise TarError(f"invalid time {text!r}") from None


def _pax_records(data: bytes) -> list[tuple[str, bytes]]:
    """`<len> <key>=<value>\\n` records, in order (GNU sparse 0.0 repeats keys)."""
    records: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise TarError("malformed PAX header")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarError("malformed PAX record length") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise TarError("malformed PAX record")
        key, _, value = record[:-1].partition(b"=")
        records.append((key.decode("utf-8", "surrogateescape"), value))
        pos += length
    return records


class TarReader:
    """Iterate with `next()`; read a member's data with `read()` before asking for the next one."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._buf = b""
        self._pos = 0
        self._left = 0  # data bytes of the current member not yet read
        self._pad = 0  # padding after them
        self._global: dict[str, bytes] = {}

    # ---- buffering -----------------------------------------------------------------------------

    def _take(self, n: int) -> bytes:
        """Exactly n bytes (fewer only at the end of the stream)."""
        avail = len(self._buf) - self._pos
        if avail >= n:
            out = self._buf[self._pos : self._pos + n]
            self._pos += n
            return out
        parts = [self._buf[self._pos :]]
        need = n - avail
        self._buf, self._pos = b"", 0
        while need > 0:
            chunk = self._raw.read(max(_CHUNK, need))
            if not chunk:
                break
            if len(chunk) > need:
                parts.append(chunk[:need])
                self._buf, self._pos = chunk, need
                need = 0
            else:
                parts.append(chunk)
                need -= len(chunk)
        return b"".join(parts)

    def _skip(self, n: int) -> None:
        while n > 0:
            got = len(self._take(min(n, _CHUNK)))
            if not got:
                raise TarError("archive ends inside an entry")
            n -= got

    def read(self, n: int) -> bytes:
        """Up to n bytes of the current member's data (b"" when it is all read)."""
        n = min(n, self._left)
        if n <= 0:
            return b""
        data = self._take(n)
        self._left -= len(data)
        return data

    # ---- headers -------------------------------------------------------------------------------

    def _block(self) -> bytes | None:
        block = self._take(BLOCK)
        if len(block) < BLOCK:
            if block.strip(b"\0"):
                raise TarError("archive ends inside a header")
            return None
        return block

    def _meta(self, size: int) -> bytes:
        if size > _MAX_META:
            raise TarError(f"extended header of {size} bytes")
        data = self._take(size)
        if len(data) < size:
            raise TarError("archive ends inside an extended header")
        self._skip(-size % BLOCK)
        return data

    def next(self) -> Member | None:
        """The next entry, or None at the end of the archive."""
        self._skip(self._left + self._pad)
        self._left = self._pad = 0
        pax: list[tuple[str, bytes]] = []
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            block = self._block()
            if block is None or not block.strip(b"\0"):
                return None  # end-of-archive blocks (or a clean end)
            fields = _HEADER.unpack_from(block)
            stored = _number(fields[6])
            if stored != sum(block[:148]) + 256 + sum(block[156:]) and stored != _signed_sum(block):
                raise TarError("header checksum mismatch")
            type_ = fields[7]
            size = _number(fields[4])
            if type_ == b"x":
                pax += _pax_records(self._meta(size))
                continue
            if type_ == b"g":
                self._global.update(_pax_records(self._meta(size)))
                continue
            if type_ == b"L":
                long_name = _cstr(self._meta(size))
                continue
            if type_ == b"K":
                long_link = _cstr(self._meta(size))
                continue
            return self._member(block, fields, type_, size, pax, long_name, long_link)

    def _member(
        self,
        block: bytes,
        fields: tuple[bytes, ...],
        type_: bytes,
        size: int,
        pax_list: list[tuple[str, bytes]],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> Member:
        name = _cstr(fields[0])
        if fields[9] == b"ustar\0":  # POSIX: the prefix field extends the name
            prefix = _cstr(fields[15])
            if prefix:
                name = prefix + b"/" + name
        member = Member(
            name=_text(long_name if long_name is not None else name),
            type=type_,
            mode=_number(fields[1]),
            uid=_number(fields[2]),
            gid=_number(fields[3]),
            size=size,
            mtime_ns=_number(fields[5]) * 1_000_000_000,
            linkname=_text(long_link if long_link is not None else _cstr(fields[8])),
            devmajor=_number(fields[13]),
            devminor=_number(fields[14]),
        )
        pax = {**self._global, **dict(pax_list)}
        stored = size  # data bytes in the archive
        if pax:
            stored = self._apply_pax(member, pax, pax_list, size)
        if type_ == b"S":  # old GNU sparse: map in the header, apparent size after it
            member.type = b"0"
            member.sparse, member.size = self._gnu_old_sparse(block)
        member.data_size = 0 if member.type in _HEADER_ONLY else stored
        self._left = member.data_size
        self._pad = -member.data_size % BLOCK
        if pax.get("GNU.sparse.major") == b"1" and pax.get("GNU.sparse.minor") == b"0":
            member.sparse = self._sparse_map_10()
        if member.isdir():
            member.name = member.name.rstrip("/") or "/"
        return member

    def _apply_pax(
        self, m: Member, pax: dict[str, bytes], ordered: list[tuple[str, bytes]], size: int
    ) -> int:
        """Fields from PAX records; returns the stored data size (PAX `size` overrides the header's)."""
        stored = size
        try:
            for key, value in pax.items():
                if key == "path":
                    m.name = _text(value)
                elif key == "linkpath":
                    m.linkname = _text(value)
                elif key == "uid":
                    m.uid = int(value)
                elif key == "gid":
                    m.gid = int(value)
                elif key == "size":
                    stored = int(value)
                elif key == "mtime":
                    m.mtime_ns = _time_ns(value.decode("ascii", "replace"))
                elif key == "atime":
                    m.atime_ns = _time_ns(value.decode("ascii", "replace"))
                elif key.startswith("SCHILY.xattr."):
                    m.xattrs[key[len("SCHILY.xattr.") :]] = value
                elif key.startswith("LIBARCHIVE.xattr."):
                    m.xattrs[_pct(key[len("LIBARCHIVE.xattr.") :])] = base64.b64decode(value + b"===")
            m.size = stored
            # GNU sparse (PAX 0.0, 0.1, 1.0): the real name and apparent size, and the map for 0.x.
            if "GNU.sparse.name" in pax:
                m.name = _text(pax["GNU.sparse.name"])
            real = pax.get("GNU.sparse.realsize", pax.get("GNU.sparse.size"))
            if real is not None:
                m.size = int(real)
            if "GNU.sparse.map" in pax:
                numbers = [int(x) for x in pax["GNU.sparse.map"].split(b",") if x]
                m.sparse = list(zip(numbers[::2], numbers[1::2], strict=True))
            elif any(k == "GNU.sparse.offset" for k, _ in ordered):
                offsets = [int(v) for k, v in ordered if k == "GNU.sparse.offset"]
                lengths = [int(v) for k, v in ordered if k == "GNU.sparse.numbytes"]
                m.sparse = list(zip(offsets, lengths, strict=True))
        except (ValueError, binascii.Error) as e:
            raise TarError(f"invalid PAX header for {m.name!r}: {e}") from None
        return stored

    def _gnu_old_sparse(self, block: bytes) -> tuple[list[tuple[int, int]], int]:
        regions = _sparse_entries(block[386:482], 4)
        extended = block[482]
        real_size = _number(block[483:495])
        while extended:
            ext = self._block()
            if ext is None:
                raise TarError("archive ends inside a sparse header")
            regions += _sparse_entries(ext[:504], 21)
            extended = ext[504]
        return regions, real_size

    def _sparse_map_10(self) -> list[tuple[int, int]]:
        """GNU sparse 1.0: the map is decimal lines at the start of the data, padded to a block."""
        numbers: list[int] = []
        buf = b""
        count: int | None = None
        consumed = 0
        while count is None or len(numbers) < 2 * count:
            while b"\n" not in buf:
                block = self.read(BLOCK)
                if not block:
                    raise TarError("archive ends inside a sparse map")
                consumed += len(block)
                buf += block
                if consumed > _MAX_META:
                    raise TarError("sparse map too large")
            line, _, buf = buf.partition(b"\n")
            try:
                value = int(line)
            except ValueError:
                raise TarError("malformed sparse map") from None
            if count is None:
                count = value
            else:
                numbers.append(value)
        return list(zip(numbers[::2], numbers[1::2], strict=True))


def _signed_sum(block: bytes) -> int:
    """The checksum as old tars computed it, with signed chars."""
    total = 256
    for i, b in enumerate(block):
        if 148 <= i < 156:
            continue
        total += b - 256 if b >= 128 else b
    return total


def _sparse_entries(raw: bytes, count: int) -> list[tuple[int, int]]:
    out = []
    for i in range(count):
        offset = _number(raw[i * 24 : i * 24 + 12])
        length = _number(raw[i * 24 + 12 : i * 24 + 24])
        if offset or length:
            out.append((offset, length))
    return out


def _pct(name: str) -> str:
    """libarchive percent-encodes xattr names in PAX keys."""
    from urllib.parse import unquote

    return unquote(name, errors="surrogateescape")
