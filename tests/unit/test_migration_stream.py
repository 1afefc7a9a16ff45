"""The RAM filter over QEMU migration streams, on streams built here in QEMU's format (VM tests cover
real ones: every hibernation test loads a filtered stream into a real VMM)."""

from __future__ import annotations

import io
import random
import struct
from collections.abc import Sequence

import pytest

from tartarus.hibernation import stream as s

PAGE = s.PAGE_SIZE


def _name(text: str) -> bytes:
    return bytes([len(text)]) + text.encode()


def _footer(section: int) -> bytes:
    return bytes([s.SECTION_FOOTER]) + struct.pack(">I", section)


def _header() -> bytes:
    config = bytes([s.CONFIGURATION]) + struct.pack(">I", 7) + b"microvm"
    caps = bytes([s.SUBSECTION]) + _name("configuration/capabilities") + struct.pack(">I", 1)
    caps += struct.pack(">I", 1) + _name("x-ignore-shared")
    return s.MAGIC + struct.pack(">I", s.VERSION) + config + caps


def _setup(blocks: dict[str, int]) -> bytes:
    out = bytes([s.SECTION_START]) + struct.pack(">I", 2) + _name("ram") + struct.pack(">II", 0, 4)
    out += struct.pack(">Q", sum(blocks.values()) | s.FLAG_MEM_SIZE)
    for name, size in blocks.items():
        out += _name(name) + struct.pack(">QQ", size, 0)
    return out + struct.pack(">Q", s.FLAG_EOS) + _footer(2)


def _page(block: str | None, index: int, fill: int | None) -> bytes:
    """A record: `fill` None is a zero page; block None continues the previous record's block."""
    flags = s.FLAG_ZERO if fill is None else s.FLAG_PAGE
    if block is None:
        flags |= s.FLAG_CONTINUE
    out = struct.pack(">Q", index * PAGE | flags) + (b"" if block is None else _name(block))
    return out + (b"\0" if fill is None else bytes([fill]) * PAGE)


def _part(records: list[bytes], kind: int = s.SECTION_PART) -> bytes:
    return (
        bytes([kind]) + struct.pack(">I", 2) + b"".join(records) + struct.pack(">Q", s.FLAG_EOS) + _footer(2)
    )


DEVICES = bytes([s.SECTION_FULL]) + struct.pack(">I", 3) + _name("timer") + struct.pack(">II", 0, 1)
DEVICES += b"opaque device state \x00\x01\x02" + _footer(3) + bytes([s.EOF_])


def _stream(*parts: bytes) -> bytes:
    return _header() + _setup({"ram": 4 * PAGE, "pc.bios": PAGE}) + b"".join(parts) + DEVICES


class _Recorder(Sequence[int]):
    """A page map that keeps every page and notes which it was asked about."""

    def __init__(self, block: str, seen: list[tuple[str, int]]) -> None:
        self.block, self.seen = block, seen

    def __len__(self) -> int:
        return 1 << 20

    def __getitem__(self, index: int) -> int:  # type: ignore[override]
        self.seen.append((self.block, index))
        return 1


def _records(data: bytes) -> list[tuple[str, int]]:
    """(block, page index) of every page record in a stream, CONTINUE resolved."""
    seen: list[tuple[str, int]] = []
    keep = {block: _Recorder(block, seen) for block in ("ram", "pc.bios")}
    s.filter_ram(io.BytesIO(data).read, keep, lambda chunk: None)
    return seen


def _filter(data: bytes, keep: s.PageMaps, read: s.Read | None = None) -> tuple[bytes, s.FilterStats]:
    out: list[bytes] = []
    stats = s.filter_ram(read or io.BytesIO(data).read, keep, out.append)
    return b"".join(out), stats


def _trickle(data: bytes, seed: int) -> s.Read:
    """A pipe that hands out the stream in uneven pieces, so records straddle every read."""
    rng = random.Random(seed)
    source = io.BytesIO(data)
    return lambda n: source.read(min(n, rng.randint(1, 3 * s.PAGE_SIZE)))


def test_unfiltered_stream_is_copied_byte_for_byte() -> None:
    data = _stream(_part([_page("ram", 0, 7), _page(None, 1, None), _page("pc.bios", 0, 9)]))
    out, stats = _filter(data, {})
    assert out == data and stats.pages_kept == 3 and stats.pages_dropped == 0


def test_only_owned_pages_are_kept_and_devices_follow_intact() -> None:
    data = _stream(
        _part([_page("ram", 0, 1), _page(None, 1, None), _page(None, 2, 3)]),
        _part([_page(None, 3, 4), _page("pc.bios", 0, 9)], kind=s.SECTION_END),
    )
    out, stats = _filter(data, {"ram": bytes([0, 1, 0, 1])})
    assert (stats.pages_kept, stats.pages_dropped) == (3, 2)  # ram 1 and 3, and the whole bios block
    assert out.endswith(DEVICES)
    assert _records(out) == [("ram", 1), ("ram", 3), ("pc.bios", 0)]
    # The first kept record follows a dropped one that named the block: it must name it itself.
    first = out.index(struct.pack(">Q", 1 * PAGE | s.FLAG_ZERO))
    assert out[first + 8 : first + 12] == _name("ram")


def test_continue_across_sections_keeps_its_block() -> None:
    data = _stream(_part([_page("pc.bios", 0, 9), _page("ram", 0, 1)]), _part([_page(None, 1, 2)]))
    out, _ = _filter(data, {"ram": bytes([0, 1, 0, 0])})
    assert _records(out) == [("pc.bios", 0), ("ram", 1)]
    assert _filter(out, {})[0] == out  # and the result is itself a well-formed stream


@pytest.mark.parametrize("seed", range(5))
def test_the_stream_may_arrive_in_any_pieces(seed: int) -> None:
    pages = [_page("ram", 0, 1)] + [_page(None, i, None if i % 3 else i) for i in range(1, 4)]
    data = _stream(_part(pages), _part([_page("pc.bios", 0, 9)], kind=s.SECTION_END))
    keep = {"ram": bytes([1, 0, 1, 1])}
    assert _filter(data, keep, _trickle(data, seed)) == _filter(data, keep)


def _command(command: int, data: bytes) -> bytes:
    return bytes([s.COMMAND]) + struct.pack(">HH", command, len(data)) + data


def test_command_sections_pass_through_where_they_stand() -> None:
    """QEMU 10 sends a command section (switchover-start) between the RAM parts and the devices: the
    filter must copy it as it is (it has no footer), not fail the hibernation."""
    switchover = _command(9, b"")
    data = _stream(_part([_page("ram", 0, 1), _page(None, 1, 2)]), switchover, _command(3, b"\x01\x02\x03"))
    out, stats = _filter(data, {"ram": bytes([0, 1, 0, 0])})
    assert (stats.pages_kept, stats.pages_dropped) == (1, 1)
    assert out.endswith(switchover + _command(3, b"\x01\x02\x03") + DEVICES)
    assert _filter(data, {}, _trickle(data, 1))[0] == data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"NOPE" + bytes(8), "not a QEMU migration stream"),
        (_stream(_part([_page("ram", 0, 1)]))[:-PAGE], "ends inside"),
        (_header() + _setup({"ram": PAGE}) + bytes([0x33]), "unexpected section type"),
        (
            _header()
            + bytes([s.SECTION_START])
            + struct.pack(">I", 5)
            + _name("block")
            + struct.pack(">II", 0, 1),
            "unsupported iterative section",
        ),
        (
            _header() + _setup({"ram": PAGE}) + _part([struct.pack(">Q", 0x40) + _name("ram")]),
            "unsupported RAM record flags",
        ),
        (_header() + _setup({"ram": PAGE})[:-5] + b"\x00" * 5, "missing section footer"),
        (_header() + _setup({"ram": PAGE}) + bytes([s.COMMAND, 0, 1, 0, 9, 1]), "ends inside"),
    ],
)
def test_streams_it_does_not_understand_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(s.StreamError, match=message):
        _filter(data, {"ram": b"\0"})
