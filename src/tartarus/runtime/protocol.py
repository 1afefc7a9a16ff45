"""Codec for the guest agent wire protocol (docs/protocol.md).

Everything read here comes from a guest we do not trust: lengths are checked before use and any
violation raises `ProtocolError`, which ends the session with that guest (never the host process).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

VERSION = 5
MAX_PAYLOAD = 1 << 20
HEADER = struct.Struct(">IIBBH")
HEADER_SIZE = HEADER.size
_FIELD = struct.Struct(">BI")
_INT = struct.Struct(">q")


class ProtocolError(Exception):
    """The peer sent something that is not valid protocol."""


class T(enum.IntEnum):
    """Frame types."""

    PING = 0x01
    EXEC = 0x02
    STDIN = 0x03
    SIGNAL = 0x04
    READ = 0x05
    WRITE = 0x06
    WRITE_DATA = 0x07
    WRITE_END = 0x08
    LIST = 0x09
    STAT = 0x0A
    MKDIR = 0x0B
    REMOVE = 0x0C
    RENAME = 0x0D
    CONFIGURE = 0x0E
    RESIZE = 0x0F
    CREDIT = 0x10
    DETACH = 0x11
    ATTACH = 0x12
    PROCS = 0x13
    INPUT = 0x14
    PSIGNAL = 0x15
    PRESIZE = 0x16
    WATCH = 0x17

    HELLO = 0x80
    OK = 0x81
    STARTED = 0x82
    STDOUT = 0x83
    STDERR = 0x84
    EXIT = 0x85
    DATA = 0x86
    END = 0x87
    ENTRY = 0x88
    PROC = 0x89
    EVENT = 0x8A
    ERROR = 0x8F


class F(enum.IntEnum):
    """Field tags."""

    ARGV = 1
    ENV = 2
    CWD = 3
    UID = 4
    GID = 5
    TIMEOUT_MS = 6
    STDIN = 7
    PATH = 8
    NEWPATH = 9
    MODE = 10
    FLAGS = 11
    PID = 12
    EXIT_CODE = 13
    SIGNAL = 14
    TIMED_OUT = 15
    ERRNO = 16
    MESSAGE = 17
    SIZE = 18
    NAME = 19
    TYPE = 20
    MTIME_NS = 21
    LINK = 22
    VERSION = 23
    TIME_NS = 24
    ENTROPY = 25
    HOSTNAME = 26
    USER = 27
    MACHINE_ID = 28
    ROWS = 29
    COLS = 30
    WINDOW = 31
    INPUT = 32


INT_FIELDS = frozenset(
    {
        F.UID,
        F.GID,
        F.TIMEOUT_MS,
        F.STDIN,
        F.MODE,
        F.FLAGS,
        F.PID,
        F.EXIT_CODE,
        F.SIGNAL,
        F.TIMED_OUT,
        F.ERRNO,
        F.SIZE,
        F.TYPE,
        F.MTIME_NS,
        F.VERSION,
        F.TIME_NS,
        F.ROWS,
        F.COLS,
        F.WINDOW,
    }
)
PTY_MAX_SIZE = 1000  # rows and columns of a terminal, as the agent checks them
INPUT_MAX = 64 * 1024  # bytes of one INPUT field
# EXEC FLAGS, and the FLAGS of PROC and of ATTACH's STARTED (docs/protocol.md, version 4).
FLAG_EOF = 1  # INPUT: close stdin after the data
FLAG_KEEP = 4  # the command outlives its requester
FLAG_PTY = 8
FLAG_STDIN = 16
FLAG_ATTACHED = 32
FLAG_RECURSIVE = 1  # WATCH: also the directories below (MKDIR: parents)
DATA_TYPES = frozenset({T.STDIN, T.WRITE_DATA, T.STDOUT, T.STDERR, T.DATA})
# Guest frames sent against a stream's credit: output, and a watch's events (version 5).
CREDITED_TYPES = DATA_TYPES | {T.EVENT}
GUEST_TYPES = frozenset(t for t in T if t >= 0x80)

FieldValue = int | bytes


@dataclass(frozen=True)
class Frame:
    type: T
    id: int
    payload: bytes = b""

    def fields(self) -> Fields:
        return Fields.decode(self.payload)


@dataclass
class Fields:
    """Decoded TLV fields; repeated tags keep their order."""

    items: list[tuple[int, bytes]] = field(default_factory=list)

    @classmethod
    def decode(cls, payload: bytes) -> Fields:
        items: list[tuple[int, bytes]] = []
        pos, end = 0, len(payload)
        while pos < end:
            if end - pos < _FIELD.size:
                raise ProtocolError("truncated field header")
            tag, length = _FIELD.unpack_from(payload, pos)
            pos += _FIELD.size
            if length > end - pos:
                raise ProtocolError(f"field {tag} runs past the payload end")
            value = payload[pos : pos + length]
            pos += length
            if tag in INT_FIELDS and length != _INT.size:
                raise ProtocolError(f"integer field {tag} has {length} bytes")
            items.append((tag, value))
        return cls(items)

    def get_int(self, tag: F, default: int | None = None) -> int | None:
        for t, v in self.items:
            if t == tag:
                return int(_INT.unpack(v)[0])
        return default

    def get_bytes(self, tag: F) -> bytes | None:
        for t, v in self.items:
            if t == tag:
                return v
        return None

    def get_str(self, tag: F, default: str = "") -> str:
        value = self.get_bytes(tag)
        return default if value is None else value.decode("utf-8", "replace")

    def get_all(self, tag: F) -> list[bytes]:
        return [v for t, v in self.items if t == tag]


def encode_fields(items: Iterable[tuple[F, FieldValue]]) -> bytes:
    out = bytearray()
    for tag, value in items:
        if isinstance(value, int):
            raw = _INT.pack(value)
        else:
            if tag not in (F.ENTROPY, F.INPUT) and b"\0" in value:
                raise ValueError(f"{tag.name} must not contain NUL bytes")
            raw = value
        out += _FIELD.pack(tag, len(raw))
        out += raw
    return bytes(out)


def encode(type_: T, id_: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), id_, type_, 0, 0) + payload


def encode_request(type_: T, id_: int, items: Iterable[tuple[F, FieldValue]] = ()) -> bytes:
    return encode(type_, id_, encode_fields(items))


def find_reply(buf: bytes | bytearray, id_: int, type_: T = T.OK) -> int:
    """Offset of the first plausible header of a `type_` frame for request `id_` in `buf`, or -1.

    How a client joining a stream mid-way (a restarted daemon) finds a frame boundary: it sends a
    request with an id nobody used and skips what comes before the answer. The id is random, so text
    that merely looks like that header is vanishingly unlikely."""
    marker = _ID_TYPE.pack(id_, type_, 0, 0)
    start = 4
    while True:
        at = buf.find(marker, start)
        if at < 0:
            return -1
        if HEADER.unpack_from(buf, at - 4)[0] <= MAX_PAYLOAD:
            return at - 4
        start = at + 1


_ID_TYPE = struct.Struct(">IBBH")


class Decoder:
    """Incremental frame decoder for a byte stream coming from a guest."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Return every complete frame now buffered; raise ProtocolError on the first bad header."""
        self._buf += data
        buf = self._buf
        frames: list[Frame] = []
        pos = 0
        while len(buf) - pos >= HEADER_SIZE:
            length, id_, type_, flags, reserved = HEADER.unpack_from(buf, pos)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_PAYLOAD} limit")
            if flags or reserved:
                raise ProtocolError("non-zero flags or reserved bits in frame header")
            if type_ not in GUEST_TYPES:
                raise ProtocolError(f"unknown frame type 0x{type_:02x} from guest")
            if len(buf) - pos < HEADER_SIZE + length:
                break
            start = pos + HEADER_SIZE
            frame = Frame(T(type_), id_, bytes(buf[start : start + length]))
            pos = start + length
            frames.append(frame)
        del buf[:pos]
        return frames
