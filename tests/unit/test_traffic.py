"""The traffic-token gate's pure part: reading a request head strictly and checking its token."""

from __future__ import annotations

import json

import pytest

from tartarus.network import traffic
from tartarus.network.traffic import BadHead, head_length, parse_head, refusal, token_ok

TOKEN = "tt_" + "a" * 43


def _head(*headers: str, line: str = "GET /x HTTP/1.1") -> bytes:
    return ("\r\n".join([line, *headers]) + "\r\n\r\n").encode()


def test_the_right_token_in_either_header_passes() -> None:
    for name in ("X-Tartarus-Traffic-Token", "x-tartarus-traffic-token", "e2b-traffic-access-token"):
        assert token_ok(parse_head(_head("Host: h", f"{name}:  {TOKEN} ")), TOKEN), name


@pytest.mark.parametrize(
    "headers",
    [
        (),  # none
        ("X-Tartarus-Traffic-Token: " + TOKEN[:-1] + "b",),  # wrong by one character
        ("X-Tartarus-Traffic-Token: " + TOKEN[:-1],),  # a prefix
        ("X-Tartarus-Traffic-Token: ",),  # empty
        ("X-Tartarus-Traffic-Token: " + TOKEN, "e2b-traffic-access-token: nope"),  # one good, one bad
        ("Authorization: " + TOKEN,),  # another header
        ("X-Tartarus-Traffic-Token-Extra: " + TOKEN,),  # a longer name
    ],
)
def test_a_missing_or_wrong_token_fails(headers: tuple[str, ...]) -> None:
    assert not token_ok(parse_head(_head(*headers)), TOKEN)


def test_the_guest_gets_the_head_without_the_token() -> None:
    head = parse_head(
        _head("Host: h", "X-Tartarus-Traffic-Token: " + TOKEN, "e2b-traffic-access-token: t", "A: b")
    )
    assert head.without_tokens() == b"GET /x HTTP/1.1\r\nHost: h\r\nA: b\r\n\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        _head(line="PRI * HTTP/2.0"),  # HTTP/2 prior knowledge: not spoken here
        _head(line="GET /x"),
        _head(line="GET  /x HTTP/1.1"),
        _head(line="G(T /x HTTP/1.1"),
        _head("Host h"),  # no colon
        _head("X-Tartarus-Traffic-Token : " + TOKEN),  # whitespace in the name: read differently elsewhere
        _head("Host: h", " folded: " + TOKEN),  # obsolete line folding
        _head("Host: a\nX-Tartarus-Traffic-Token: " + TOKEN),  # a bare LF inside a line
        b"\x16\x03\x01\x02\x00\r\n\r\n",  # TLS
        b"GET /x HTTP/1.1\r\n",  # no blank line
    ],
)
def test_heads_other_than_strict_http1_are_refused(raw: bytes) -> None:
    with pytest.raises(BadHead) as e:
        parse_head(raw)
    assert e.value.status == 400


def test_head_length_waits_for_the_blank_line_and_caps_the_buffer() -> None:
    raw = _head("Host: h")
    assert head_length(raw[:-1]) is None
    assert head_length(raw + b"body") == len(raw)
    assert head_length(b"x" * traffic.MAX_HEAD) is None
    with pytest.raises(BadHead) as e:
        head_length(b"x" * (traffic.MAX_HEAD + 1))
    assert e.value.status == 431


def test_a_refusal_is_a_complete_response_with_the_api_error_body() -> None:
    raw = refusal(403, traffic.FORBIDDEN)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert f"Content-Length: {len(body)}".encode() in head and b"Connection: close" in head
    assert json.loads(body) == {"error": {"code": "forbidden", "message": traffic.FORBIDDEN}}
    assert TOKEN.encode() not in raw
