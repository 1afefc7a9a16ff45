"""Lazy wake: a saved sandbox's memory as one file its VMM maps, so pages load when the guest touches them.

Where the state directory's filesystem has reflinks (`reflink.supported`), a wake does not copy the
sandbox's own pages into its VMM before the guest may run (`image.load_pages`). It makes
`<workdir>/memory.ram`: the pinned template's memory file cloned, the image's own pages cloned over it
at their offsets, data shared with both, written nowhere; the VMM maps that file privately instead of
the template's, exactly as a cold start maps the template's, and loads the device state only. The
guest then faults its pages in when it touches them.

A VMM mapping such a file owns more than its anonymous pages: the pages cloned from the image are
file pages it never wrote, yet differ from the template. They are listed beside the file
(`memory.ram.own`, the image's runs), and a capture adds them to the ones the page table shows
(`with_base`), so that its image is again relative to the template and loads anywhere.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

from tartarus.hibernation import reflink, remote
from tartarus.hibernation.dirty import own_pages_at, ram_mapping
from tartarus.hibernation.image import Image, Run
from tartarus.hibernation.stream import PAGE_SIZE
from tartarus.private import write_private

MEMORY = "memory.ram"  # in a sandbox's working directory
OWN_SUFFIX = ".own"


def own_list(memory_file: Path) -> Path:
    return memory_file.with_name(memory_file.name + OWN_SUFFIX)


def available(state_dir: Path, image: Image | None) -> bool:
    """A lazy wake of `image` is possible: a format-2 image on a filesystem with reflinks."""
    return image is not None and reflink.supported(state_dir)


def build(template_memory: Path, state: Path, image: Image, dest: Path) -> None:
    """`dest`: the template's memory with `image`'s pages (in the file `state`) over it, all cloned;
    beside it, the list of those pages. Both on the filesystem of `template_memory` and `state`."""
    reflink.clone_file(template_memory, dest)
    try:
        with open(state, "rb") as src, open(dest, "r+b") as out:
            reflink.clone_ranges(src.fileno(), out.fileno(), _ranges(image))
        write_runs(own_list(dest), image.runs)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def template_clone(template_memory: Path) -> Callable[[Path], Path]:
    """What makes a spare VMM's memory file (`Sandbox.prepare`): the template's, cloned into its working
    directory, for a wake to clone a sandbox's pages into (`fill`) before its guest runs."""

    def make(workdir: Path) -> Path:
        dest = workdir / MEMORY
        reflink.clone_file(template_memory, dest)
        return dest

    return make


def fill(memory_file: Path, state: Path, image: Image, pid: int) -> None:
    """`image`'s pages cloned into `memory_file`, the template's clone that the VMM `pid` (whose guest
    has not run) maps privately: it sees them as it faults them in. A page the VMM wrote while it
    started holds a copy of its own, which no change to the file reaches: those are copied in."""
    with open(state, "rb") as src, open(memory_file, "r+b") as out:
        reflink.clone_ranges(src.fileno(), out.fileno(), _ranges(image))
        start, length = ram_mapping(pid, memory_file)
        own = own_pages_at(pid, start, length)
        at = image.pages_at
        for first, n in image.runs:
            if any(own[first : first + n]):
                data = bytearray(os.pread(src.fileno(), n * PAGE_SIZE, at))
                span = (start + first * PAGE_SIZE, n * PAGE_SIZE)
                remote.write(pid, [(remote.address_of(data), len(data))], [span])
            at += n * PAGE_SIZE
    write_runs(own_list(memory_file), image.runs)


def _ranges(image: Image) -> list[tuple[int, int, int]]:
    """(offset in the image, length, offset in guest RAM) of each run of pages."""
    ranges, at = [], image.pages_at
    for first, n in image.runs:
        ranges.append((at, n * PAGE_SIZE, first * PAGE_SIZE))
        at += n * PAGE_SIZE
    return ranges


def write_runs(path: Path, runs: Sequence[Run]) -> None:
    flat = [x for run in runs for x in run]
    write_private(path, struct.pack(f">{len(flat)}I", *flat))


def read_runs(path: Path) -> list[Run]:
    raw = path.read_bytes()
    flat = struct.unpack(f">{len(raw) // 4}I", raw)
    return list(zip(flat[::2], flat[1::2], strict=True))


def with_base(own: bytes, memory_file: Path) -> bytes:
    """`own` (one byte per page, 1 = owned, from the page table) plus the pages `memory_file` holds
    over the template, if it is a lazy wake's file; as it is for a template's memory file."""
    listed = own_list(memory_file)
    if not listed.exists():
        return own
    base = bytearray(len(own))
    for first, n in read_runs(listed):
        base[first : first + n] = b"\x01" * n
    return (int.from_bytes(own, "big") | int.from_bytes(base, "big")).to_bytes(len(own), "big")
