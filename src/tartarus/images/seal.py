"""Seal a process's mount namespace: every mount read-only except the directories it may write.

The conversion worker applies hostile tar streams as root. Its path guard keeps entries inside the
image root, but a bug in it would otherwise write the host's files (a broken guard in a scratch copy
once overwrote `/etc/passwd`). Called in the worker's own mount namespace (`unshare --mount`, private
propagation) before it reads a byte of any layer, this makes such a bug fail with EROFS anywhere but
the worker's own output directory. Device nodes stay usable (a read-only mount refuses writes to files,
not to devices), so loop mounts still work. Only the caller's namespace changes; it dies with the worker.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

# mount_setattr(2) (Linux 5.12): one call makes a whole mount tree read-only, including mounts no
# one listed. The number is the same on every architecture (the unified syscall table).
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_REC = 0x1, 0x20, 0x1000, 0x4000


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str, path: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} {path}: {os.strerror(err)}")


def _setattr(path: str, flags: int, attr: _MountAttr) -> None:
    result = _libc.syscall(
        _SYS_MOUNT_SETATTR, _AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    _check(result, "mount_setattr", path)


def _mount_points() -> list[str]:
    """Every mount point of this namespace, parents before children (field 5 of mountinfo)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split(" ")[4]
        points.append(point.encode().decode("unicode_escape"))  # octal escapes: \040 for a space
    return points


def _all_read_only() -> None:
    try:
        _setattr("/", _AT_RECURSIVE, _MountAttr(attr_set=_MOUNT_ATTR_RDONLY))
        return
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
    for point in _mount_points():  # kernels before 5.12: one remount per mount point
        _check(
            _libc.mount(None, point.encode(), None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY, None),
            "remount",
            point,
        )


def seal_all_but(*writable: Path) -> None:
    """Make every mount of this (private) namespace read-only, then each `writable` directory read-write
    again. Fails, before anything else runs, if any step does: the worker must not run unsealed."""
    paths = [str(p.resolve(strict=True)) for p in writable]
    _all_read_only()
    for path in paths:
        _check(_libc.mount(path.encode(), path.encode(), None, _MS_BIND | _MS_REC, None), "bind", path)
        try:
            _setattr(path, 0, _MountAttr(attr_clr=_MOUNT_ATTR_RDONLY))
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            _check(_libc.mount(None, path.encode(), None, _MS_REMOUNT | _MS_BIND, None), "remount", path)
