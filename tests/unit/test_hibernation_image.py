"""Format 2 of a captured sandbox's memory: its layout, the runs of owned pages, the snapshot prefix its
device state is put behind, and clear errors for files it is not (VM tests write and wake real ones:
tests/vm/test_hibernation_pages.py)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from tartarus.hibernation import image, remote
from tartarus.hibernation import stream as s
from tests.unit.test_migration_stream import DEVICES, _page, _part, _stream

PAGE = s.PAGE_SIZE


def test_runs_of_a_page_map() -> None:
    assert image.runs_of(bytes([0, 1, 1, 0, 0, 1, 0, 1, 1, 1])) == [(1, 2), (5, 1), (7, 3)]
    assert image.runs_of(bytes(8)) == []
    assert image.runs_of(b"\x01" * 4) == [(0, 4)]


def test_batches_split_by_bytes_and_by_iov_max() -> None:
    assert list(remote.batches([(0, 10), (100, 5)], 8)) == [[(0, 8)], [(8, 2), (100, 5)]]
    many = [(i * 10, 1) for i in range(remote.IOV_MAX + 3)]
    batches = list(remote.batches(many, 1 << 30))
    assert [len(b) for b in batches] == [remote.IOV_MAX, 3]
    assert [span for b in batches for span in b] == many


def test_own_memory_round_trip_through_an_image(tmp_path: Path) -> None:
    """`write` reads pages from a process (here this one) and `load_pages` writes them back."""
    pages = 6
    source = bytearray(os.urandom(pages * PAGE))
    runs = [(0, 2), (4, 1)]
    dest = tmp_path / "memory.state"
    device = b"QEVM\x00\x00\x00\x03device"
    size = image.write(dest, os.getpid(), remote.address_of(source), runs, device)
    assert size == dest.stat().st_size
    layout = image.read_header(dest)
    assert layout is not None
    assert (layout.pages, layout.runs, layout.pages_at % PAGE) == (3, tuple(runs), 0)
    with open(dest, "rb") as f:
        f.seek(layout.device_at)
        assert f.read(layout.device_len) == device
    target = bytearray(pages * PAGE)
    image.load_pages(dest, layout, os.getpid(), remote.address_of(target))
    for first, n in runs:
        assert target[first * PAGE : (first + n) * PAGE] == source[first * PAGE : (first + n) * PAGE]
    assert target[2 * PAGE : 4 * PAGE] == bytes(2 * PAGE), "a page not in a run was written"


def test_a_qemu_stream_is_format_1(tmp_path: Path) -> None:
    path = tmp_path / "memory.state"
    path.write_bytes(_stream())
    assert image.read_header(path) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage" * 10, "unknown format"),
        (b"TTHB" + struct.pack(">II", 3, PAGE) + bytes(40), "format 3"),
        (b"TTHB" + struct.pack(">IIQQQQQ", 2, PAGE, PAGE, 1, 2 * PAGE, 0, 5), "truncated"),
    ],
)
def test_files_it_cannot_load_are_clear_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "memory.state"
    path.write_bytes(content)
    with pytest.raises(image.ImageError, match=message):
        image.read_header(path)


def test_ram_prefix_is_the_stream_before_its_devices() -> None:
    data = _stream(_part([_page("pc.bios", 0, 7)]), _part([], s.SECTION_END))
    prefix = s.ram_prefix(data)
    assert data == prefix + DEVICES
    with pytest.raises(s.StreamError):
        s.ram_prefix(b"QEVM" + struct.pack(">I", 2))
