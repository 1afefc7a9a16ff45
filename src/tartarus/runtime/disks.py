"""Per-sandbox writable layers ("Lethe"): a private ext4 disk joined to the read-only base by overlayfs.

A layer is a sparse copy of one pre-formatted empty filesystem, so creating one costs a few metadata
blocks rather than an mkfs; destroying the sandbox deletes the file, and with it everything written.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

from tartarus.bootfiles.cache import cached, digest
from tartarus.private import opener

DEFAULT_LAYER_MIB = 4096


def empty_layer(size_mib: int = DEFAULT_LAYER_MIB) -> Path:
    """A formatted, empty ext4 image of `size_mib`, built once per size."""

    def build(out: Path) -> None:
        image = out / "layer.ext4"
        subprocess.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-O",
                "^has_journal",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
                "-L",
                "tartarus-rw",
                str(image),
                f"{size_mib}M",
            ],
            check=True,
            capture_output=True,
        )

    return cached("layers", digest(["ext4-nojournal-v1", str(size_mib)]), build) / "layer.ext4"


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy only the allocated extents of `src` (SEEK_DATA/SEEK_HOLE) into a new sparse `dst`."""
    with src.open("rb") as fin, open(dst, "xb", opener=opener) as fout:  # guest data: 0600
        size = os.fstat(fin.fileno()).st_size
        ifd, ofd = fin.fileno(), fout.fileno()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(ifd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole remains
                    break
                raise
            end = os.lseek(ifd, start, os.SEEK_HOLE)
            _copy_range(ifd, ofd, start, end)
            pos = end
        os.ftruncate(ofd, size)


def _copy_range(ifd: int, ofd: int, start: int, end: int) -> None:
    """In-kernel copy where the filesystems allow it; read and write where not (across filesystems)."""
    offset = start
    while offset < end:
        try:
            n = os.copy_file_range(ifd, ofd, end - offset, offset, offset)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = os.pwrite(ofd, os.pread(ifd, min(end - offset, 1 << 20), offset), offset)
        if n == 0:
            break
        offset += n


def create_layer(dst: Path, size_mib: int = DEFAULT_LAYER_MIB) -> Path:
    sparse_copy(empty_layer(size_mib), dst)
    return dst
