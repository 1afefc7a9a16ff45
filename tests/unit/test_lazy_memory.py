"""Lazy wake's bookkeeping: the pages a per-sandbox memory file holds over its template count as the
sandbox's own in the next capture, and a filesystem without reflinks is detected, not assumed."""

from __future__ import annotations

from pathlib import Path

from tartarus.hibernation import lazy, reflink
from tartarus.hibernation.image import Image


def test_pages_of_the_file_count_as_owned(tmp_path: Path) -> None:
    memory = tmp_path / lazy.MEMORY
    lazy.write_runs(lazy.own_list(memory), [(1, 2), (6, 1)])
    own = bytes([0, 0, 1, 0, 0, 0, 0, 1])  # the page table: pages 2 and 7 written since the wake
    assert lazy.with_base(own, memory) == bytes([0, 1, 1, 0, 0, 0, 1, 1])
    assert lazy.read_runs(lazy.own_list(memory)) == [(1, 2), (6, 1)]


def test_a_template_file_adds_nothing(tmp_path: Path) -> None:
    own = bytes([1, 0, 1])
    assert lazy.with_base(own, tmp_path / "memory") == own


def test_image_pages_land_at_their_guest_offsets() -> None:
    found = Image(pages_at=4096, pages=3, device_at=4 * 4096, device_len=10, runs=((5, 2), (9, 1)))
    assert lazy._ranges(found) == [(4096, 2 * 4096, 5 * 4096), (3 * 4096, 4096, 9 * 4096)]


def test_tmpfs_has_no_reflinks() -> None:
    assert not reflink.supported(Path("/dev/shm"))
    assert not list(Path("/dev/shm").glob(f"{reflink.PROBE}*")), "the probe left its files"
