"""Snapshots of a file tree for the umoci equivalence oracle: everything an image defines, per path."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Snapshot = dict[str, dict[str, Any]]


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISBLK, "block"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "unknown"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: Path) -> Snapshot:
    """path → names, types, modes, owners, link targets, device numbers, xattrs, content hashes, mtimes
    (directories' included), and the other members of each hard-link group."""
    out: Snapshot = {}
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    paths = ["/"]
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        prefix = "/" if rel == "." else f"/{rel}/"
        paths += [prefix + name for name in dirnames + filenames]
    for rel in paths:
        full = root / rel.lstrip("/") if rel != "/" else root
        st = os.lstat(full)
        kind = _kind(st.st_mode)
        item: dict[str, Any] = {
            "type": kind,
            "mode": oct(stat.S_IMODE(st.st_mode)),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime_ns": st.st_mtime_ns,
            "xattrs": sorted(
                (name, os.getxattr(full, name, follow_symlinks=False))
                for name in os.listxattr(full, follow_symlinks=False)
            ),
        }
        if kind == "file":
            item["size"] = st.st_size
            item["sha256"] = _sha256(full)
        elif kind == "symlink":
            item["target"] = os.readlink(full)
            del item["mode"]  # symlink modes are not settable; both sides show 0777
        elif kind in ("char", "block"):
            item["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if kind != "dir" and st.st_nlink > 1:
            groups[(st.st_dev, st.st_ino)].append(rel)
        out[rel] = item
    for members in groups.values():
        for rel in members:
            out[rel]["hardlinks"] = sorted(m for m in members if m != rel)
    return out


def differences(expected: Snapshot, actual: Snapshot, limit: int = 20) -> list[str]:
    """Human-readable differences, for assertion messages."""
    diffs: list[str] = []
    for path in sorted(set(expected) | set(actual)):
        if path not in actual:
            diffs.append(f"missing: {path} {expected[path]['type']}")
        elif path not in expected:
            diffs.append(f"unexpected: {path} {actual[path]['type']}")
        elif expected[path] != actual[path]:
            keys = sorted(set(expected[path]) | set(actual[path]))
            detail = ", ".join(
                f"{k}: {expected[path].get(k)!r} != {actual[path].get(k)!r}"
                for k in keys
                if expected[path].get(k) != actual[path].get(k)
            )
            diffs.append(f"differs: {path}: {detail}")
        if len(diffs) >= limit:
            diffs.append("...")
            break
    return diffs


@contextlib.contextmanager
def mounted(image: Path, fstype: str) -> Iterator[Path]:
    """`mount -o loop,ro` in a temporary directory, unmounted and removed afterwards."""
    mnt = Path(tempfile.mkdtemp(prefix="tartarus-test-mnt-"))
    try:
        subprocess.run(["mount", "-t", fstype, "-o", "loop,ro", str(image), str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        mnt.rmdir()


@contextlib.contextmanager
def umoci_rootfs(layout: Path, tag: str) -> Iterator[Path]:
    """`umoci unpack` of layout:tag into a temporary bundle (on tmpfs: it is only read back)."""
    parent = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="tartarus-test-umoci-", dir=parent) as tmp:
        bundle = Path(tmp) / "bundle"
        proc = subprocess.run(
            ["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)], capture_output=True, text=True
        )
        assert proc.returncode == 0, f"umoci unpack {layout}:{tag} failed: {proc.stderr[-2000:]}"
        yield bundle / "rootfs"
