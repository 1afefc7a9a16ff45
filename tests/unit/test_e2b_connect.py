"""The Connect framing of the E2B endpoint (tartarus.e2b.connect): well-formed envelopes round-trip, and
every malformed one is a clear Connect error, never a partial message."""

from __future__ import annotations

import json
import struct

import pytest

from tartarus.e2b import connect
from tartarus.e2b.connect import ConnectError


def frame(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def test_an_envelope_is_flags_length_and_json() -> None:
    data = connect.envelope({"event": {"start": {"pid": 7}}})
    assert data[0] == 0
    assert struct.unpack(">I", data[1:5])[0] == len(data) - 5
    assert json.loads(data[5:]) == {"event": {"start": {"pid": 7}}}
    assert connect.decode_envelopes(data + connect.envelope({"a": 1})) == [
        {"event": {"start": {"pid": 7}}},
        {"a": 1},
    ]


def test_end_of_stream_carries_the_flag_and_the_error() -> None:
    ok = connect.end_stream()
    assert ok[0] == connect.END_STREAM and json.loads(ok[5:]) == {}
    failed = connect.end_stream(ConnectError("deadline_exceeded", "too slow"))
    assert json.loads(failed[5:]) == {"error": {"code": "deadline_exceeded", "message": "too slow"}}


@pytest.mark.parametrize(
    ("body", "code", "says"),
    [
        (b"\x00\x00\x00", "invalid_argument", "truncated envelope header"),
        (frame(b'{"a": 1}')[:-2], "invalid_argument", "declares 8 bytes, 6 sent"),
        (frame(b"{not json"), "invalid_argument", "not valid JSON"),
        (frame(b"[1, 2]"), "invalid_argument", "must be a JSON object"),
        (frame(b"\xff\xfe"), "invalid_argument", "not valid JSON"),
        (frame(b"{}", flags=0x01), "unimplemented", "compressed"),
        (frame(b"{}", flags=0x80), "invalid_argument", "unknown envelope flags"),
    ],
)
def test_malformed_envelopes_are_refused_clearly(body: bytes, code: str, says: str) -> None:
    with pytest.raises(ConnectError) as caught:
        connect.decode_envelopes(body)
    assert caught.value.code == code
    assert says in caught.value.message


def test_an_oversized_frame_is_refused_by_its_header_before_its_bytes_arrive() -> None:
    header_only = struct.pack(">BI", 0, connect.MAX_FRAME + 1)
    with pytest.raises(ConnectError) as caught:
        connect.decode_envelopes(header_only)
    assert caught.value.code == "resource_exhausted"
    assert caught.value.http_status == 429


def test_a_streaming_request_holds_exactly_one_message() -> None:
    assert connect.decode_single(connect.envelope({"x": 1})) == {"x": 1}
    for body in (b"", connect.envelope({}) + connect.envelope({})):
        with pytest.raises(ConnectError, match="expected one request message"):
            connect.decode_single(body)


def test_deadlines_parse_as_the_protocol_says() -> None:
    assert connect.timeout_s(None) is None
    assert connect.timeout_s("1500") == 1.5
    for bad in ("-1", "1.5", "12345678901", "soon"):
        with pytest.raises(ConnectError):
            connect.timeout_s(bad)


def test_codes_map_to_the_statuses_connect_clients_expect() -> None:
    assert ConnectError("not_found", "").http_status == 404
    assert ConnectError("unauthenticated", "").http_status == 401
    assert ConnectError("unimplemented", "").http_status == 501
    with pytest.raises(ValueError):
        ConnectError("teapot", "")
