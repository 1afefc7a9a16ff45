"""The traffic token of a protected exposed port: the first HTTP/1.x request head of each connection.

An exposed port is a TCP forwarder, so its address is no secret: any local user can find it by a scan.
A protected port therefore speaks HTTP/1.x and reads the head of each connection's first request before
anything reaches the guest (or wakes it): the head must carry the sandbox's traffic token in
`X-Tartarus-Traffic-Token` (or E2B's `e2b-traffic-access-token`), else the connection is answered 403
and closed. The token headers are removed before the head is forwarded, so the guest never sees the token;
the rest of the connection (keep-alive requests, upgrades) is piped as it comes.

Pure functions only: the forwarder (`tartarus.network.expose`) does the I/O.
"""

from __future__ import annotations

import hmac
import json
import secrets
from dataclasses import dataclass

TOKEN_HEADER = "X-Tartarus-Traffic-Token"
E2B_TOKEN_HEADER = "e2b-traffic-access-token"
_TOKEN_NAMES = frozenset({TOKEN_HEADER.lower(), E2B_TOKEN_HEADER})

MAX_HEAD = 16 << 10  # a request head larger than this is refused (431), never buffered further
HEAD_TIMEOUT_S = 10.0  # a client that has not sent its head by then holds no slot any longer
_VERSIONS = frozenset({b"HTTP/1.0", b"HTTP/1.1"})
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def mint_token() -> str:
    return "tt_" + secrets.token_urlsafe(32)


class BadHead(Exception):
    """The bytes are not an HTTP/1.x request head this gate accepts; `status` is the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RequestHead:
    request_line: bytes
    headers: tuple[tuple[bytes, bytes], ...]  # (name as sent, value stripped of surrounding whitespace)

    def tokens(self) -> list[bytes]:
        """The values of every traffic-token header the client sent."""
        return [value for name, value in self.headers if name.lower().decode() in _TOKEN_NAMES]

    def without_tokens(self) -> bytes:
        """The head as it goes to the guest: the same request, with no traffic-token header."""
        kept = [
            name + b": " + value for name, value in self.headers if name.lower().decode() not in _TOKEN_NAMES
        ]
        return b"\r\n".join([self.request_line, *kept]) + b"\r\n\r\n"


def head_length(buffer: bytes) -> int | None:
    """Length of the complete head at the start of `buffer` (through its blank line), None if not yet
    all there; BadHead(431) once more than MAX_HEAD bytes came without one."""
    end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
    if end >= 0:
        return end + 4
    if len(buffer) > MAX_HEAD:
        raise BadHead(431, f"the request head is larger than {MAX_HEAD} bytes")
    return None


def parse_head(head: bytes) -> RequestHead:
    """An HTTP/1.x request head (ending in its blank line), strictly: a line folded or a name with
    whitespace in it is refused rather than read one way here and another way by the guest's server."""
    lines = head[:-4].split(b"\r\n") if head.endswith(b"\r\n\r\n") else []
    if not lines:
        raise BadHead(400, "not an HTTP request head")
    request_line = lines[0]
    if b"\r" in request_line or b"\n" in request_line:
        raise BadHead(400, "not an HTTP request line")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _TOKEN_CHARS or not parts[1]:
        raise BadHead(400, "not an HTTP request line")
    if parts[2] not in _VERSIONS:
        raise BadHead(400, "a protected port speaks HTTP/1.0 or HTTP/1.1 only")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or not set(name) <= _TOKEN_CHARS:
            raise BadHead(400, "malformed header line")
        if b"\n" in value or b"\r" in value:
            raise BadHead(400, "malformed header line")
        headers.append((name, value.strip(b" \t")))
    return RequestHead(request_line, tuple(headers))


def token_ok(head: RequestHead, expected: str) -> bool:
    """Whether the head presents `expected`: at least one token header, and every one equal to it
    (compared in constant time)."""
    presented = head.tokens()
    want = expected.encode()
    return bool(presented) and all(hmac.compare_digest(value, want) for value in presented)


_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
}
_CODES = {400: "invalid_argument", 403: "forbidden", 408: "timeout", 431: "invalid_argument"}


def refusal(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response with the API's error body; the connection closes after it."""
    body = json.dumps({"error": {"code": _CODES[status], "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


FORBIDDEN = f"this port needs the sandbox's traffic token in the {TOKEN_HEADER} header"
