"""The Connect protocol's framing (connectrpc.com/docs/protocol), JSON codec only: what envd speaks.

A streamed message is an envelope: one flag byte, a 4-byte big-endian length, then that many bytes of
JSON. The last envelope of a response stream carries the END_STREAM flag and holds `{}` or
`{"error": {"code", "message"}}`. Unary calls are plain JSON; their errors are an HTTP status and the
same error object. Pure functions, so malformed input is tested apart from any route.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

END_STREAM = 0x02
COMPRESSED = 0x01
HEADER = struct.Struct(">BI")
# envd's own requests are a few KiB; a client-sent frame larger than this is refused, never buffered.
MAX_FRAME = 4 << 20

# The HTTP status a unary error (or a refused request) carries for each Connect code.
HTTP_STATUS = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}


@dataclass(eq=False)  # not frozen: frameworks set an exception's __traceback__
class ConnectError(Exception):
    """An error as Connect carries it: a code from HTTP_STATUS and a message."""

    code: str
    message: str

    def __post_init__(self) -> None:
        if self.code not in HTTP_STATUS:
            raise ValueError(f"not a Connect code: {self.code}")

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def body(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def envelope(message: dict[str, Any], *, flags: int = 0) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(flags, len(data)) + data


def end_stream(error: ConnectError | None = None) -> bytes:
    """The stream's last envelope: success, or the error that ended it."""
    return envelope({"error": error.body()} if error else {}, flags=END_STREAM)


def decode_single(body: bytes, *, max_frame: int = MAX_FRAME) -> dict[str, Any]:
    """The one message of a server-streaming request's body (exactly one envelope, uncompressed)."""
    messages = decode_envelopes(body, max_frame=max_frame)
    if len(messages) != 1:
        raise ConnectError("invalid_argument", f"expected one request message, got {len(messages)}")
    return messages[0]


def decode_envelopes(body: bytes, *, max_frame: int = MAX_FRAME) -> list[dict[str, Any]]:
    """Every message of an enveloped body; a truncated, compressed or oversized frame, or one that is
    not a JSON object, is an `invalid_argument` / `resource_exhausted` error, never a partial result."""
    messages = []
    at = 0
    while at < len(body):
        if len(body) - at < HEADER.size:
            raise ConnectError("invalid_argument", "truncated envelope header")
        flags, length = HEADER.unpack_from(body, at)
        at += HEADER.size
        if flags & COMPRESSED:
            raise ConnectError("unimplemented", "compressed messages are not supported")
        if flags & ~(COMPRESSED | END_STREAM):
            raise ConnectError("invalid_argument", f"unknown envelope flags {flags:#x}")
        if length > max_frame:
            raise ConnectError("resource_exhausted", f"message of {length} bytes exceeds {max_frame}")
        if len(body) - at < length:
            raise ConnectError("invalid_argument", f"envelope declares {length} bytes, {len(body) - at} sent")
        messages.append(decode_json(body[at : at + length]))
        at += length
    return messages


async def stream_envelopes(
    chunks: AsyncIterator[bytes], *, max_frame: int = MAX_FRAME
) -> AsyncIterator[dict[str, Any]]:
    """A client stream's messages as their envelopes arrive (chunks split anywhere), holding at most one
    frame; the same refusals as `decode_envelopes`, raised when the bad frame is reached."""
    pending = bytearray()
    async for chunk in chunks:
        pending += chunk
        while len(pending) >= HEADER.size:
            _, length = HEADER.unpack_from(pending, 0)
            if length > max_frame:
                raise ConnectError("resource_exhausted", f"message of {length} bytes exceeds {max_frame}")
            if len(pending) - HEADER.size < length:
                break
            (message,) = decode_envelopes(bytes(pending[: HEADER.size + length]), max_frame=max_frame)
            del pending[: HEADER.size + length]
            yield message
    if pending:
        raise ConnectError("invalid_argument", "the stream ended inside an envelope")


def decode_json(data: bytes) -> dict[str, Any]:
    """A unary request's (or an envelope's) JSON object."""
    try:
        value = json.loads(data) if data.strip() else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise ConnectError("invalid_argument", f"request is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ConnectError("invalid_argument", "request must be a JSON object")
    return value


def timeout_s(header: str | None) -> float | None:
    """`Connect-Timeout-Ms` in seconds (None: no deadline); at most 10 digits, as the protocol says."""
    if header is None:
        return None
    if not header.isdigit() or len(header) > 10:
        raise ConnectError("invalid_argument", f"Connect-Timeout-Ms must be up to 10 digits, not {header!r}")
    return int(header) / 1000
