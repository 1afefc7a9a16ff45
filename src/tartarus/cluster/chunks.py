"""Content-addressed chunks: split a file into fixed-size pieces, name each by its SHA-256, compress it.

Fixed-size rather than content-defined: the files captured (a VM's memory image, an ext4 layer) are
block-addressed, so an unchanged page or block stays at the same offset and a fixed 4 MiB grid finds it;
content-defined chunking pays a rolling hash over every byte for shifts these files do not have. The key
is the hash of the *raw* bytes, so dedup does not depend on the compressor or its level, and a download
proves integrity by decompressing and re-hashing against the key. zstd (the `zstandard` package the
project already pins) at a low level: memory images are mostly zero or repetitive pages.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from tartarus.cluster.errors import ChunkCorrupt
from tartarus.errors import InvalidArgument

CHUNK_SIZE = 4 * 1024 * 1024
LEVEL = 3
_HEX = re.compile(r"^[0-9a-f]{64}$")
_local = threading.local()  # zstd contexts are not thread-safe; uploads compress on a pool


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of a file: its SHA-256 (hex) and raw length."""

    digest: str
    size: int

    def __post_init__(self) -> None:
        if not _HEX.match(self.digest):
            raise InvalidArgument(f"a chunk digest must be 64 lowercase hex characters: {self.digest!r}")
        if not 0 < self.size <= 64 * 1024 * 1024:
            raise InvalidArgument(f"chunk size {self.size} out of range")

    @property
    def key(self) -> str:
        """Object key: fanned out by the first two hex digits, as stores list prefixes faster that way."""
        return f"chunks/{self.digest[:2]}/{self.digest}.zst"


@dataclass(frozen=True)
class Sealed:
    ref: ChunkRef
    blob: bytes  # compressed


def split(stream: BinaryIO, size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The stream's bytes in pieces of `size` (the last may be shorter); one piece in memory at a time."""
    if size <= 0:
        raise InvalidArgument("the chunk size must be positive")
    while True:
        piece = stream.read(size)
        while piece and len(piece) < size:  # a pipe or socket may return short reads before EOF
            more = stream.read(size - len(piece))
            if not more:
                break
            piece += more
        if not piece:
            return
        yield piece
        if len(piece) < size:
            return


@dataclass(frozen=True)
class Hole:
    """`size` bytes the file does not store (a hole in a sparse file): they read as zeros."""

    size: int


def pieces(stream: BinaryIO, size: int = CHUNK_SIZE) -> Iterator[bytes | Hole]:
    """Like `split`, but a piece lying wholly in a hole of a sparse file (a sandbox's writable layer is
    gigabytes of which a few MiB are allocated) is a `Hole`, neither read nor hashed."""
    if size <= 0:
        raise InvalidArgument("the chunk size must be positive")
    fd = stream.fileno()
    end = os.fstat(fd).st_size
    offset = 0
    while offset < end:
        n = min(size, end - offset)
        try:
            data_at = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no data after offset; other errors: read it all
                raise
            data_at = end
        if data_at >= offset + n:
            yield Hole(n)
        else:
            stream.seek(offset)
            piece = next(split(stream, n), b"")
            if len(piece) != n:
                raise OSError(f"the file shrank while it was read (at byte {offset + len(piece)})")
            yield piece
        offset += n


@functools.cache
def zero(size: int) -> Sealed:
    """The chunk of `size` zero bytes (what a hole is stored as), computed once per size."""
    return seal(bytes(size))


def seal(raw: bytes) -> Sealed:
    if not hasattr(_local, "c"):
        _local.c = zstandard.ZstdCompressor(level=LEVEL)
    compressor: zstandard.ZstdCompressor = _local.c
    return Sealed(ChunkRef(hashlib.sha256(raw).hexdigest(), len(raw)), compressor.compress(raw))


def unseal(ref: ChunkRef, blob: bytes) -> bytes:
    """The raw bytes, proven to be the chunk `ref` names; ChunkCorrupt otherwise."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=ref.size)
    except zstandard.ZstdError as e:
        raise ChunkCorrupt(f"chunk {ref.key} does not decompress: {e}") from e
    if len(raw) != ref.size or hashlib.sha256(raw).hexdigest() != ref.digest:
        raise ChunkCorrupt(f"chunk {ref.key} does not match its SHA-256: the stored object is corrupt")
    return raw
