"""Apply image layers (tar streams) to a directory, with OCI semantics and without trusting the archive.

Semantics follow the OCI image spec and match `umoci unpack`: entries replace what is there (except a
directory over a directory, which keeps its children); `.wh.NAME` deletes NAME and `.wh..wh..opq` empties
its directory, but only of what lower layers put there; hard links, symlinks, devices, fifos, owners,
modes, mtimes and xattrs are reproduced.

Safety: every path is resolved one component at a time with `openat(O_NOFOLLOW)` from a descriptor of
the root, the way a chroot would: `..` and absolute paths are clamped at the root, a symlink met on the
way is expanded *inside* the root, and the last component is never followed — an existing symlink there
is replaced, not written through. So no entry can reach outside the root, whatever the archive holds.
What cannot be applied faithfully either is neutralised with a warning naming the entry (escaping paths
are clamped, forbidden xattrs dropped, runs of zeros in big files written as holes) or fails with an
`UnsafeLayer` / `ImageError` naming it (a hard link to a missing target or a directory, a non-directory
replacing the root, limits on size, entry count and depth exceeded). The tree is private to one
conversion (a single writer), so a type checked here cannot change before it is used.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tartarus.images.errors import ImageError, UnsafeLayer
from tartarus.images.tarstream import BLOCKDEV, CHAR, FIFO, Member, TarError, TarReader

log = logging.getLogger(__name__)

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
# Host-specific (SELinux labels, NFSv4 ACLs) or read by the guest's overlayfs, for which the image is
# the lower layer: such an xattr would change what the sandbox sees, so it is dropped with a warning.
FORBIDDEN_XATTRS = ("security.selinux", "system.nfs4_acl")
FORBIDDEN_XATTR_PREFIXES = ("trusted.overlay.",)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
_HOLE_MIN_FILE = 1 << 20  # zero runs are looked for only in files at least this big
_HOLE_BLOCK = 64 << 10
_ZEROS = bytes(_HOLE_BLOCK)
_MAX_SYMLINKS = 40
_CACHE_SIZE = 64
_MAX_WARNINGS = 50
_NODE_TYPES = {CHAR: stat.S_IFCHR, BLOCKDEV: stat.S_IFBLK, FIFO: stat.S_IFIFO}


@dataclass(frozen=True)
class Limits:
    """Bounds a hostile archive could otherwise push to filling the disk or exhausting inodes."""

    max_entries: int = 2_000_000
    max_bytes: int = 64 * 2**30  # apparent size of all regular files
    max_depth: int = 256


@dataclass
class ApplyReport:
    entries: int = 0
    data_bytes: int = 0  # bytes of file content written
    apparent_bytes: int = 0  # sum of regular file sizes (holes included)
    hole_bytes: int = 0
    inodes: int = 0
    warnings: list[str] = field(default_factory=list)
    warning_count: int = 0


def _clean(name: str) -> list[str]:
    """Lexically clean a tar path rooted at `/`: drop empty and `.` parts, clamp `..` at the root."""
    out: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if out:
                out.pop()
            continue
        out.append(part)
    return out


def _escapes(name: str) -> bool:
    depth = 0
    for part in name.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return name.startswith("/")


class LayerApplier:
    """Applies layers in order to `root` (an empty directory this process owns)."""

    def __init__(self, root: Path, limits: Limits | None = None) -> None:
        self.root = root
        self.limits = limits or Limits()
        self.report = ApplyReport()
        self._root_fd = os.open(root, _DIR_FLAGS)
        self._cache: dict[tuple[str, ...], tuple[int, str]] = {}
        self._retired: list[int] = []  # descriptors dropped from the cache, closed after the entry
        self._as_root = os.geteuid() == 0
        # Paths this layer created (and their ancestors), which its whiteouts must spare. Kept as hashes:
        # ~60 bytes per entry instead of ~220, so 2 million entries stay well under the memory budget.
        # A collision (odds ~1e-7 at that size) could only make a whiteout keep a file, never escape.
        self._upper: set[int] = set()
        self._dir_times: dict[str, int] = {}
        self._layer = ""
        self._entry = ""

    # ---- public ----------------------------------------------------------------------------

    def apply(self, stream: BinaryIO, what: str) -> None:
        """Apply one uncompressed layer tar; `what` names the layer in messages."""
        self._layer = what
        self._upper = set()
        reader = TarReader(stream)
        first = True
        while True:
            try:
                member = reader.next()
            except TarError as e:
                if first:
                    raise ImageError(f"{what}: not a tar archive ({e})") from e
                raise ImageError(f"{what}: corrupt tar after entry {self._entry!r}: {e}") from e
            first = False
            if member is None:
                break
            self._entry = member.name
            self.report.entries += 1
            if self.report.entries > self.limits.max_entries:
                raise UnsafeLayer(f"{what}: more than {self.limits.max_entries} entries in the image")
            try:
                self._apply_entry(reader, member)
            except ImageError:
                raise
            except TarError as e:
                raise ImageError(f"{what}: entry {member.name!r}: {e}") from e
            except OSError as e:
                raise ImageError(f"{what}: entry {member.name!r}: {e.strerror or e}") from e
            except (ValueError, OverflowError) as e:  # owner, device numbers or times out of range
                raise ImageError(f"{what}: entry {member.name!r}: invalid header: {e}") from e
            finally:
                self._close_retired()
        self._upper = set()

    def finish(self) -> ApplyReport:
        """Restore directory mtimes (creating children changed them), deepest first; close.

        A root no layer has an entry for gets mtime 0, as with umoci: the image is then the same bytes
        whenever it is built."""
        self._dir_times.setdefault("", 0)
        for rel in sorted(self._dir_times, key=lambda p: p.count("/") + (1 if p else 0), reverse=True):
            ns = self._dir_times[rel]
            with contextlib.suppress(OSError, ImageError):
                if not rel:
                    os.utime(self._root_fd, ns=(ns, ns))
                    continue
                parts = rel.split("/")
                parent, _ = self._resolve(parts[:-1], create=False)
                if parent is not None:
                    os.utime(parts[-1], ns=(ns, ns), dir_fd=parent, follow_symlinks=False)
        self.close()
        return self.report

    def close(self) -> None:
        self._drop_cache()
        self._close_retired()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> LayerApplier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- warnings and resolution -----------------------------------------------------------

    def _warn(self, message: str) -> None:
        text = f"{self._layer}: entry {self._entry!r}: {message}"
        self.report.warning_count += 1
        if len(self.report.warnings) < _MAX_WARNINGS:
            self.report.warnings.append(text)
            log.warning("%s", text)

    def _drop_cache(self) -> None:
        """Invalidate every cached directory. Their descriptors stay open until the current entry is
        done, because its code may still hold them (closing early could let a number be reused)."""
        self._retired.extend(fd for fd, _ in self._cache.values())
        self._cache.clear()

    def _close_retired(self) -> None:
        while self._retired:
            os.close(self._retired.pop())

    def _resolve(self, parts: list[str], *, create: bool) -> tuple[int | None, str]:
        """Descriptor and root-relative real path of directory `parts`, resolved as if chrooted.

        Missing directories are created (0755, root-owned; a later entry fixes them) when `create`, else
        (None, ""). The descriptor belongs to the cache: callers must not close it.
        """
        key = tuple(parts)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        fds: list[int] = []  # opened here, below the root
        names: list[str] = []
        todo = list(reversed(parts))
        links = 0
        try:
            while todo:
                part = todo.pop()
                if part in ("", "."):
                    continue
                if part == "..":
                    if fds:
                        os.close(fds.pop())
                        names.pop()
                    continue
                cur = fds[-1] if fds else self._root_fd
                try:
                    fd = os.open(part, _DIR_FLAGS, dir_fd=cur)
                except FileNotFoundError:
                    if not create:
                        return None, ""
                    os.mkdir(part, 0o755, dir_fd=cur)
                    fd = os.open(part, _DIR_FLAGS, dir_fd=cur)
                    self.report.inodes += 1
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.stat(part, dir_fd=cur, follow_symlinks=False)
                    if not stat.S_ISLNK(st.st_mode):
                        if not create:
                            return None, ""
                        where = "/".join([*names, part])
                        raise ImageError(
                            f"{self._layer}: entry {self._entry!r}: /{where} is not a directory"
                        ) from e
                    links += 1
                    if links > _MAX_SYMLINKS:
                        raise UnsafeLayer(
                            f"{self._layer}: entry {self._entry!r}: too many levels of symbolic links"
                        ) from e
                    target = os.readlink(part, dir_fd=cur)
                    if target.startswith("/"):
                        for opened in fds:
                            os.close(opened)
                        fds, names = [], []
                    todo.extend(reversed(target.split("/")))
                    continue
                fds.append(fd)
                names.append(part)
                if len(fds) > self.limits.max_depth:
                    raise UnsafeLayer(
                        f"{self._layer}: entry {self._entry!r}: "
                        f"deeper than {self.limits.max_depth} directories"
                    )
            result = (fds.pop(), "/".join(names)) if fds else (os.dup(self._root_fd), "")
        finally:
            for opened in fds:
                os.close(opened)
        if len(self._cache) >= _CACHE_SIZE:
            old = next(iter(self._cache))
            self._retired.append(self._cache.pop(old)[0])
        self._cache[key] = result
        return result

    def _mark_upper(self, rel: str) -> None:
        while rel and hash(rel) not in self._upper:
            self._upper.add(hash(rel))
            rel = rel.rpartition("/")[0]

    # ---- removal -----------------------------------------------------------------------------

    def _remove(self, parent: int, name: str, rel: str, st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=parent)  # fd-based: never follows a symlink inside
        else:
            os.unlink(name, dir_fd=parent)
        self._forget(rel)

    def _forget(self, rel: str) -> None:
        """Something at `rel` went away: cached descriptors and recorded dir mtimes may be stale."""
        self._drop_cache()
        prefix = rel + "/"
        for key in [k for k in self._dir_times if k == rel or k.startswith(prefix)]:
            del self._dir_times[key]

    def _whiteout(self, parent: int, name: str, rel: str, keep_self: bool) -> None:
        """Remove `rel` and what is below it, sparing what this layer itself put there."""
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if hash(rel) not in self._upper and not keep_self:
            self._remove(parent, name, rel, st)
            return
        if not stat.S_ISDIR(st.st_mode):
            return
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        try:
            for child in os.listdir(fd):
                self._whiteout(fd, child, f"{rel}/{child}" if rel else child, keep_self=False)
        finally:
            os.close(fd)

    # ---- entries -----------------------------------------------------------------------------

    def _apply_entry(self, reader: TarReader, m: Member) -> None:
        if _escapes(m.name):
            self._warn("path leads outside the image root: clamped inside it")
        parts = _clean(m.name)
        if len(parts) > self.limits.max_depth:
            raise UnsafeLayer(f"{self._layer}: entry {m.name!r} is deeper than {self.limits.max_depth}")
        if not parts:
            if not m.isdir():
                raise UnsafeLayer(
                    f"{self._layer}: entry {m.name!r} would replace the root with a non-directory"
                )
            self._metadata_fd(self._root_fd, m, is_dir=True)
            self._dir_times[""] = self._mtime_ns(m)
            return
        name = parts[-1]
        if name.startswith(WHITEOUT):
            self._apply_whiteout(parts)
            return
        parent, parent_rel = self._resolve(parts[:-1], create=True)
        assert parent is not None
        rel = f"{parent_rel}/{name}" if parent_rel else name
        try:
            existing: os.stat_result | None = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and not (m.isdir() and stat.S_ISDIR(existing.st_mode)):
            if m.islnk() and self._same_as_link_target(m, existing):
                self._warn("hard link to itself: ignored")
                return
            self._remove(parent, name, rel, existing)
            existing = None
        if m.isreg():
            self._make_file(reader, m, parent, name)
        elif m.isdir():
            if existing is None:
                os.mkdir(name, 0o700, dir_fd=parent)
                self.report.inodes += 1
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            try:
                self._metadata_fd(fd, m, is_dir=True)
            finally:
                os.close(fd)
            self._dir_times[rel] = self._mtime_ns(m)
        elif m.issym():
            self._make_symlink(m, parent, name)
        elif m.islnk():
            self._make_hardlink(m, parent, name)
        elif m.type in _NODE_TYPES:
            kind = _NODE_TYPES[m.type]
            os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=parent)
            self.report.inodes += 1
            self._metadata_path(parent, name, m)
        else:
            raise ImageError(f"{self._layer}: entry {m.name!r} has unsupported tar type {m.type!r}")
        self._mark_upper(rel)

    def _apply_whiteout(self, parts: list[str]) -> None:
        name = parts[-1]
        parent, parent_rel = self._resolve(parts[:-1], create=False)
        if parent is None:
            return  # nothing below to hide
        if name == OPAQUE:
            if parent_rel:
                up, _, base = parent_rel.rpartition("/")
                grand, _ = self._resolve(up.split("/") if up else [], create=False)
                if grand is not None:
                    self._whiteout(grand, base, parent_rel, keep_self=True)
            else:
                for child in os.listdir(parent):
                    self._whiteout(parent, child, child, keep_self=False)
            return
        if name.startswith(WHITEOUT + WHITEOUT):
            self._warn("AUFS metadata entry: ignored")
            return
        target = name[len(WHITEOUT) :]
        if target in ("", ".", ".."):
            self._warn("whiteout names no file: ignored")
            return
        self._whiteout(parent, target, f"{parent_rel}/{target}" if parent_rel else target, keep_self=False)

    def _same_as_link_target(self, m: Member, existing: os.stat_result) -> bool:
        parts = _clean(m.linkname)
        if not parts:
            return False
        parent, _ = self._resolve(parts[:-1], create=False)
        if parent is None:
            return False
        try:
            st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == (existing.st_dev, existing.st_ino)

    def _make_hardlink(self, m: Member, parent: int, name: str) -> None:
        if _escapes(m.linkname):
            self._warn(f"hard link target {m.linkname!r} leads outside the image root: clamped inside it")
        parts = _clean(m.linkname)
        missing = UnsafeLayer(
            f"{self._layer}: entry {m.name!r}: hard link target {m.linkname!r} does not exist in the image"
        )
        if not parts:
            raise UnsafeLayer(f"{self._layer}: entry {m.name!r}: hard link to the root directory")
        tparent, _ = self._resolve(parts[:-1], create=False)
        if tparent is None:
            raise missing
        try:
            st = os.stat(parts[-1], dir_fd=tparent, follow_symlinks=False)
        except FileNotFoundError:
            raise missing from None
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeLayer(f"{self._layer}: entry {m.name!r}: hard link to directory {m.linkname!r}")
        os.link(parts[-1], name, src_dir_fd=tparent, dst_dir_fd=parent, follow_symlinks=False)

    def _make_symlink(self, m: Member, parent: int, name: str) -> None:
        os.symlink(m.linkname, name, dir_fd=parent)
        self.report.inodes += 1
        if self._as_root:
            os.chown(name, m.uid, m.gid, dir_fd=parent, follow_symlinks=False)
        self._set_xattrs(f"/proc/self/fd/{parent}/{name}", m, follow=False)
        ns = self._mtime_ns(m)
        os.utime(name, ns=(self._atime_ns(m, ns), ns), dir_fd=parent, follow_symlinks=False)

    def _make_file(self, reader: TarReader, m: Member, parent: int, name: str) -> None:
        if m.size < 0 or m.size > self.limits.max_bytes:
            raise UnsafeLayer(f"{self._layer}: entry {m.name!r} declares {m.size} bytes, over the limit")
        self.report.apparent_bytes += m.size
        if self.report.apparent_bytes > self.limits.max_bytes:
            raise UnsafeLayer(
                f"{self._layer}: entry {m.name!r}: files add up to more than {self.limits.max_bytes} bytes"
            )
        regions = self._regions(m)
        fd = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent
        )
        self.report.inodes += 1
        try:
            sparse_aware = m.size >= _HOLE_MIN_FILE
            for offset, length in regions:
                self._copy(reader, fd, offset, length, sparse_aware)
            if m.sparse is not None or sparse_aware:
                os.ftruncate(fd, m.size)
            self._metadata_fd(fd, m, is_dir=False)
        finally:
            os.close(fd)

    def _regions(self, m: Member) -> list[tuple[int, int]]:
        """The data regions of a member: one for a plain file, the validated map of a sparse one."""
        sparse = m.sparse
        if sparse is None:
            return [(0, m.size)]
        end = 0
        for offset, length in sparse:
            if offset < end or length < 0 or offset + length > m.size:
                raise UnsafeLayer(f"{self._layer}: entry {m.name!r} has an invalid sparse map")
            end = offset + length
        if sum(length for _, length in sparse) > m.data_size:
            raise UnsafeLayer(
                f"{self._layer}: entry {m.name!r}: sparse map describes more data than it holds"
            )
        self.report.hole_bytes += m.size - sum(length for _, length in sparse)
        return list(sparse)

    def _copy(self, src: TarReader, fd: int, offset: int, length: int, sparse_aware: bool) -> None:
        if offset:
            os.lseek(fd, offset, os.SEEK_SET)
        left = length
        while left:
            chunk = src.read(min(left, _CHUNK))
            if not chunk:
                raise ImageError(f"{self._layer}: entry {self._entry!r}: archive ends inside the file")
            left -= len(chunk)
            if sparse_aware:
                self._write_sparse(fd, chunk)
            else:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            self.report.data_bytes += len(chunk)

    def _write_sparse(self, fd: int, chunk: bytes) -> None:
        """Write `chunk`, leaving holes where whole aligned 64 KiB blocks are zero (a gzip bomb of zeros
        costs no disk)."""
        view = memoryview(chunk)
        pos = 0
        while pos < len(view):
            block = view[pos : pos + _HOLE_BLOCK]
            if len(block) == _HOLE_BLOCK and block == _ZEROS:
                os.lseek(fd, _HOLE_BLOCK, os.SEEK_CUR)
                self.report.hole_bytes += _HOLE_BLOCK
            else:
                while block:
                    block = block[os.write(fd, block) :]
            pos += _HOLE_BLOCK

    # ---- metadata ------------------------------------------------------------------------------

    @staticmethod
    def _mtime_ns(m: Member) -> int:
        return m.mtime_ns

    @staticmethod
    def _atime_ns(m: Member, mtime_ns: int) -> int:
        return m.atime_ns if m.atime_ns is not None else mtime_ns

    def _metadata_fd(self, fd: int, m: Member, *, is_dir: bool) -> None:
        """Owner, then mode (chown clears set-id bits), then xattrs (chown clears capabilities), then
        times: the order umoci and GNU tar use."""
        if self._as_root:
            os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, m.mode & 0o7777)
        self._set_xattrs(fd, m, follow=True, clear=is_dir)
        if not is_dir:
            ns = self._mtime_ns(m)
            os.utime(fd, ns=(self._atime_ns(m, ns), ns))

    def _metadata_path(self, parent: int, name: str, m: Member) -> None:
        """For device nodes and fifos, which cannot be opened safely; just created, so not symlinks."""
        if self._as_root:
            os.chown(name, m.uid, m.gid, dir_fd=parent, follow_symlinks=False)
        os.chmod(name, m.mode & 0o7777, dir_fd=parent)
        self._set_xattrs(f"/proc/self/fd/{parent}/{name}", m, follow=False)
        ns = self._mtime_ns(m)
        os.utime(name, ns=(self._atime_ns(m, ns), ns), dir_fd=parent, follow_symlinks=False)

    def _xattrs(self, m: Member) -> Iterator[tuple[str, bytes]]:
        for name, value in m.xattrs.items():
            if name in FORBIDDEN_XATTRS or name.startswith(FORBIDDEN_XATTR_PREFIXES):
                self._warn(f"xattr {name!r} dropped (host-specific or read by the guest's overlayfs)")
                continue
            yield name, value

    def _set_xattrs(self, path: int | str, m: Member, *, follow: bool, clear: bool = False) -> None:
        wanted = dict(self._xattrs(m))
        if clear:
            for name in os.listxattr(path, follow_symlinks=follow):
                if name not in wanted and name not in FORBIDDEN_XATTRS:
                    os.removexattr(path, name, follow_symlinks=follow)
        for name, value in wanted.items():
            try:
                os.setxattr(path, name, value, follow_symlinks=follow)
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EPERM, errno.EINVAL):
                    raise
                self._warn(f"xattr {name!r} could not be set: {e.strerror}")
