"""Reflinks (FICLONE, FICLONERANGE): a file, or part of one, shared with another until either is written.

On a filesystem that has them (XFS with reflink=1, btrfs) a woken sandbox's memory is a file made of
metadata only: the template's memory file cloned, the sandbox's own pages cloned over it from its
saved image (`tartarus.hibernation.lazy`). Elsewhere (ext4, tmpfs) the ioctls fail, which `supported`
asks once per filesystem; nothing here ever falls back to copying.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from tartarus.private import opener

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)
_RANGE = struct.Struct("=qQQQ")  # src_fd, src_offset, src_length, dest_offset
# What a filesystem (or a pair of them) without reflinks answers.
UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV, errno.ENOSYS)
PROBE = ".reflink-probe"


def supported(directory: Path) -> bool:
    """True if files in `directory` can be cloned: tried on two scratch files there, never assumed
    from the filesystem's name. Asked once per filesystem (device)."""
    return _supported_on(os.stat(directory).st_dev, str(directory))


@functools.cache
def _supported_on(device: int, directory: str) -> bool:
    src = Path(directory) / f"{PROBE}.{os.getpid()}"
    dst = src.with_suffix(".clone")
    try:
        with open(src, "wb", opener=opener) as f:
            f.write(b"\0" * 4096)
        clone_file(src, dst)
        return True
    except OSError as e:
        if e.errno in UNSUPPORTED:
            return False
        raise
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


def clone_file(src: Path, dst: Path) -> None:
    """`dst`, new (0600), sharing all of `src`'s data."""
    with open(src, "rb") as fin, open(dst, "xb", opener=opener) as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
        except BaseException:
            dst.unlink(missing_ok=True)
            raise


def clone_into(src: Path, dst: Path) -> None:
    """The existing file `dst` (of `src`'s size) made to share all of `src`'s data: whoever has it open
    reads `src`'s content from then on, through the same inode."""
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        if os.fstat(fin.fileno()).st_size != os.fstat(fout.fileno()).st_size:
            raise ValueError(f"{dst} and {src} differ in size")
        fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())


def clone_ranges(src_fd: int, dst_fd: int, ranges: Iterable[tuple[int, int, int]]) -> None:
    """Each (source offset, length, destination offset) of `src_fd` shared into `dst_fd`, replacing
    what the destination held there. Offsets and lengths must be multiples of the block size."""
    for src_offset, length, dst_offset in ranges:
        fcntl.ioctl(dst_fd, FICLONERANGE, _RANGE.pack(src_fd, src_offset, length, dst_offset))
