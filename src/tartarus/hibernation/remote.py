"""Copy guest pages straight between our memory and a paused VMM's (process_vm_readv/writev).

A hibernation reads the pages a sandbox owns out of its VMM's RAM mapping, and a wake writes them into
the new VMM's, instead of pushing every guest page through QEMU's migration stream and a parser: one
system call moves up to 1024 runs of pages. Both need the right to ptrace the VMM (the daemon's own
child, or CAP_SYS_PTRACE); without it they fail with PermissionError and the caller falls back.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator, Sequence

IOV_MAX = 1024


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_SIGNATURE = (
    ctypes.c_int,
    ctypes.POINTER(_IOVec),
    ctypes.c_ulong,
    ctypes.POINTER(_IOVec),
    ctypes.c_ulong,
    ctypes.c_ulong,
)
_readv = _libc.process_vm_readv
_readv.argtypes = _SIGNATURE
_readv.restype = ctypes.c_ssize_t
_writev = _libc.process_vm_writev
_writev.argtypes = _SIGNATURE
_writev.restype = ctypes.c_ssize_t

Span = tuple[int, int]  # (address, length)


def _iovecs(spans: Sequence[Span]) -> ctypes.Array[_IOVec]:
    array = (_IOVec * len(spans))()
    for i, (address, length) in enumerate(spans):
        array[i].base, array[i].len = address, length
    return array


def _transfer(write: bool, pid: int, local: Sequence[Span], remote: Sequence[Span]) -> None:
    """Move every byte named, in order; a short transfer (the VMM unmapped something) is an error."""
    call = _writev if write else _readv
    want = sum(length for _, length in remote)
    if want != sum(length for _, length in local):
        raise ValueError("local and remote spans differ in length")
    lvec, rvec = _iovecs(local), _iovecs(remote)
    done = call(pid, lvec, len(local), rvec, len(remote), 0)
    if done < 0:
        errno = ctypes.get_errno()
        raise OSError(
            errno, f"process_vm_{'writev' if write else 'readv'} of pid {pid}: {os.strerror(errno)}"
        )
    if done != want:
        raise OSError(f"short copy with process {pid}: {done} of {want} bytes")


def read(pid: int, local: Sequence[Span], remote: Sequence[Span]) -> None:
    _transfer(False, pid, local, remote)


def write(pid: int, local: Sequence[Span], remote: Sequence[Span]) -> None:
    _transfer(True, pid, local, remote)


def batches(spans: Sequence[Span], limit: int) -> Iterator[list[Span]]:
    """`spans` in groups of at most IOV_MAX spans and `limit` bytes, a span split where it must be."""
    batch: list[Span] = []
    size = 0
    for address, length in spans:
        while length:
            take = min(length, limit - size)
            batch.append((address, take))
            size += take
            address += take
            length -= take
            if size == limit or len(batch) == IOV_MAX:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def address_of(buffer: bytearray | mmap.mmap) -> int:
    """The address of a writable buffer's first byte (the buffer must outlive its use)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))
