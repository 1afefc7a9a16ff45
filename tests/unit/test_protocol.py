"""The host codec must reject every malformed frame a hostile guest could send, without crashing."""

from __future__ import annotations

import struct

import pytest

from tartarus.runtime.protocol import (
    HEADER,
    MAX_PAYLOAD,
    Decoder,
    F,
    Fields,
    ProtocolError,
    T,
    encode,
    encode_fields,
    encode_request,
    find_reply,
)


def test_round_trip_fields() -> None:
    payload = encode_fields([(F.ARGV, b"ls"), (F.ARGV, b"-l"), (F.TIMEOUT_MS, 1500), (F.UID, -1)])
    fields = Fields.decode(payload)
    assert fields.get_all(F.ARGV) == [b"ls", b"-l"]
    assert fields.get_int(F.TIMEOUT_MS) == 1500
    assert fields.get_int(F.UID) == -1
    assert fields.get_int(F.GID) is None


def test_decoder_reassembles_split_frames() -> None:
    frames = encode(T.STDOUT, 7, b"hello") + encode(T.EXIT, 7, encode_fields([(F.EXIT_CODE, 3)]))
    decoder = Decoder()
    got = []
    for i in range(len(frames)):  # one byte at a time
        got += decoder.feed(frames[i : i + 1])
    assert [(f.type, f.id) for f in got] == [(T.STDOUT, 7), (T.EXIT, 7)]
    assert got[0].payload == b"hello"
    assert got[1].fields().get_int(F.EXIT_CODE) == 3


def test_oversized_frame_rejected_before_buffering() -> None:
    header = HEADER.pack(MAX_PAYLOAD + 1, 1, T.STDOUT, 0, 0)
    with pytest.raises(ProtocolError, match="exceeds"):
        Decoder().feed(header)


@pytest.mark.parametrize(
    "header",
    [
        HEADER.pack(0, 1, 0x42, 0, 0),  # unknown type
        HEADER.pack(0, 1, T.PING, 0, 0),  # a host-to-guest type coming from the guest
        HEADER.pack(0, 1, T.OK, 1, 0),  # flags set
        HEADER.pack(0, 1, T.OK, 0, 9),  # reserved set
    ],
)
def test_bad_headers_rejected(header: bytes) -> None:
    with pytest.raises(ProtocolError):
        Decoder().feed(header)


def test_field_running_past_payload_rejected() -> None:
    payload = struct.pack(">BI", F.MESSAGE, 100) + b"short"
    with pytest.raises(ProtocolError, match="past the payload"):
        Fields.decode(payload)


def test_integer_field_of_wrong_width_rejected() -> None:
    payload = struct.pack(">BI", F.EXIT_CODE, 4) + b"\0\0\0\1"
    with pytest.raises(ProtocolError, match="integer"):
        Fields.decode(payload)


def test_truncated_field_header_rejected() -> None:
    with pytest.raises(ProtocolError, match="truncated"):
        Fields.decode(b"\x01\x00")


def test_nul_in_string_field_refused_on_encode() -> None:
    with pytest.raises(ValueError, match="NUL"):
        encode_request(T.EXEC, 1, [(F.ARGV, b"a\0b")])


def test_entropy_may_contain_nul() -> None:
    payload = encode_fields([(F.ENTROPY, b"\0\x01\0")])
    assert Fields.decode(payload).get_bytes(F.ENTROPY) == b"\0\x01\0"


def test_unknown_tags_are_ignored() -> None:
    payload = struct.pack(">BI", 200, 3) + b"xyz" + encode_fields([(F.PID, 5)])
    assert Fields.decode(payload).get_int(F.PID) == 5


def test_find_reply_skips_a_torn_stream_to_the_answer() -> None:
    """A restarted daemon joins the guest's stream mid-frame; it finds the answer to its own request."""
    torn = encode(T.STDOUT, 7, b"x" * 100)[40:]  # the tail of a frame the dead daemon half-read
    late = encode(T.EXIT, 7, encode_fields([(F.EXIT_CODE, 0)]))
    answer = encode(T.OK, 0xABCDEF, encode_fields([(F.VERSION, 1)]))
    stream = torn + late + answer + encode(T.STDOUT, 9, b"next")
    at = find_reply(stream, 0xABCDEF)
    assert at == len(torn) + len(late)
    frames = Decoder().feed(stream[at:])
    assert [(f.type, f.id) for f in frames] == [(T.OK, 0xABCDEF), (T.STDOUT, 9)]
    assert find_reply(stream, 0xABCDEE) == -1
    assert find_reply(answer[:11], 0xABCDEF) == -1  # not yet whole: wait for more


def test_find_reply_ignores_a_lookalike_with_an_impossible_length() -> None:
    fake = struct.pack(">IIBBH", 0xFFFFFFFF, 0x1234, T.OK, 0, 0)
    real = encode(T.OK, 0x1234)
    assert find_reply(fake + real, 0x1234) == len(fake)


def test_terminal_size_fields_round_trip() -> None:
    """EXEC's ROWS/COLS and the RESIZE frame (host → guest) are plain integer fields."""
    frame = encode_request(T.RESIZE, 5, [(F.ROWS, 50), (F.COLS, 132)])
    length, id_, type_, flags, reserved = HEADER.unpack_from(frame)
    assert (type_, id_, flags, reserved, length) == (0x0F, 5, 0, 0, len(frame) - HEADER.size)
    fields = Fields.decode(frame[HEADER.size :])
    assert (fields.get_int(F.ROWS), fields.get_int(F.COLS)) == (50, 132)
    assert (F.ROWS, F.COLS) == (29, 30)


def test_terminal_size_field_of_wrong_width_rejected() -> None:
    with pytest.raises(ProtocolError, match="integer field 29"):
        Fields.decode(struct.pack(">BI", F.ROWS, 2) + b"\x00\x18")


def test_resize_is_not_a_guest_frame() -> None:
    with pytest.raises(ProtocolError, match="unknown frame type 0x0f"):
        Decoder().feed(encode(T.RESIZE, 1))
