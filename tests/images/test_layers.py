"""Layer application: OCI semantics, and hostile archives that must never touch anything outside the root.

Each hostile case checks both halves of the contract: the violation is neutralised (with a warning naming
the entry) or fails with an error naming the entry, and a sentinel tree beside the root is unchanged.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from tartarus.images import testing as t
from tartarus.images.errors import ImageError, UnsafeLayer
from tartarus.images.layers import ApplyReport, LayerApplier, Limits
from tests.images.treecmp import Snapshot, snapshot


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A tree next to the root that no layer may modify: tmp/outside/{file,dir/}."""
    out = tmp_path / "outside"
    (out / "dir").mkdir(parents=True)
    (out / "file").write_text("precious\n")
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "deep" / "er" / "root"
    r.mkdir(parents=True)
    return r


def apply(root: Path, *layers: list[t.Entry], limits: Limits | None = None) -> ApplyReport:
    with LayerApplier(root, limits) as applier:
        for i, entries in enumerate(layers):
            applier.apply(io.BytesIO(t.tar_bytes(entries)), f"layer {i}")
        return applier.finish()


def everything_but(tmp_path: Path, root: Path) -> Snapshot:
    snap = snapshot(tmp_path)
    rel = "/" + str(root.relative_to(tmp_path))
    return {k: v for k, v in snap.items() if k != rel and not k.startswith(rel + "/") and k != "/"}


def test_dotdot_and_absolute_paths_are_clamped_inside_the_root(
    tmp_path: Path, root: Path, outside: Path
) -> None:
    before = everything_but(tmp_path, root)
    report = apply(
        root,
        [
            t.file("../../../escape-dotdot", b"1"),
            t.file("/abs-escape", b"2"),
            t.file("a/../../../b", b"3"),
            t.file(f"{outside}/file", b"4"),
        ],
    )
    assert everything_but(tmp_path, root) == before
    assert (root / "escape-dotdot").read_bytes() == b"1"
    assert (root / "abs-escape").read_bytes() == b"2"
    assert (root / "b").read_bytes() == b"3"
    assert (root / str(outside).lstrip("/") / "file").read_bytes() == b"4"
    assert any("'../../../escape-dotdot'" in w and "outside" in w for w in report.warnings)
    assert any("'/abs-escape'" in w for w in report.warnings)


def test_writing_through_a_symlink_that_points_outside_stays_inside(
    tmp_path: Path, root: Path, outside: Path
) -> None:
    before = everything_but(tmp_path, root)
    apply(
        root,
        [
            t.symlink("abs", str(outside)),
            t.symlink("rel", "../../../../../../../../" + str(outside).lstrip("/")),
            t.symlink("rootlink", "/"),
            t.symlink("chain", "abs"),
        ],
        [
            t.file("abs/file", b"overwritten?"),
            t.file("rel/dir/new", b"created?"),
            t.file("rootlink/etc/passwd", b"root::0:0::/:/bin/sh\n"),
            t.file("chain/dir/chained", b"x"),
        ],
    )
    assert everything_but(tmp_path, root) == before
    inside = root / str(outside).lstrip("/")
    assert (inside / "file").read_bytes() == b"overwritten?"
    assert (inside / "dir" / "new").read_bytes() == b"created?"
    assert (inside / "dir" / "chained").read_bytes() == b"x"
    assert (root / "etc" / "passwd").read_bytes().startswith(b"root::")
    assert os.readlink(root / "abs") == str(outside)  # the symlink itself is kept as the image says


def test_an_existing_symlink_is_replaced_never_written_through(
    tmp_path: Path, root: Path, outside: Path
) -> None:
    before = everything_but(tmp_path, root)
    apply(
        root,
        [t.symlink("victim", str(outside / "file")), t.symlink("victim-dir", str(outside / "dir"))],
        [
            t.file("victim", b"new content"),
            t.directory("victim-dir", 0o700),
            t.symlink("same-layer", str(outside / "file")),
            t.file("same-layer", b"dup"),
        ],
    )
    assert everything_but(tmp_path, root) == before
    assert (outside / "file").read_text() == "precious\n"
    assert not (root / "victim").is_symlink() and (root / "victim").read_bytes() == b"new content"
    assert (root / "victim-dir").is_dir() and not (root / "victim-dir").is_symlink()
    assert (root / "same-layer").read_bytes() == b"dup"


def test_hard_links_out_of_the_root_fail_with_the_entry_named(tmp_path: Path, root: Path) -> None:
    host = Path("/etc/passwd")
    links_before = host.stat().st_nlink
    with pytest.raises(UnsafeLayer, match=r"'hl'.*'\.\./\.\./\.\./\.\./etc/passwd' does not exist"):
        apply(root, [t.hardlink("hl", "../../../../etc/passwd")])
    with pytest.raises(UnsafeLayer, match=r"'hl2'.*does not exist"):
        apply(root, [t.symlink("sl", "/etc"), t.hardlink("hl2", "sl/passwd")])
    with pytest.raises(UnsafeLayer, match=r"'hl3'.*does not exist"):
        apply(root, [t.hardlink("hl3", str(host))])
    assert host.stat().st_nlink == links_before
    # With the target present *inside* the root, the clamped link is made to it.
    apply(root, [t.directory("etc"), t.file("etc/passwd", b"inside\n"), t.hardlink("hl4", "/../etc/passwd")])
    assert (root / "hl4").stat().st_ino == (root / "etc/passwd").stat().st_ino


def test_hard_links_to_missing_targets_and_directories_fail(root: Path) -> None:
    with pytest.raises(UnsafeLayer, match=r"'a'.*'nowhere' does not exist"):
        apply(root, [t.hardlink("a", "nowhere")])
    with pytest.raises(UnsafeLayer, match=r"'b'.*hard link to directory"):
        apply(root, [t.directory("d"), t.hardlink("b", "d")])


def test_a_huge_sparse_file_is_refused(tmp_path: Path, root: Path) -> None:
    entry = t.sparse_file("huge", 2**40, [(0, b"head"), (2**40 - 4, b"tail")])
    with pytest.raises(UnsafeLayer, match=r"huge.*over the limit"):
        apply(root, [entry])
    total = sum(p.stat().st_blocks for p in tmp_path.rglob("*") if p.is_file())
    assert total * 512 < 2**20


def test_sparse_files_and_zero_runs_are_written_as_holes(root: Path) -> None:
    size = 8 * 2**30
    report = apply(
        root,
        [
            t.sparse_file("sparse", size, [(4096, b"a" * 100), (size - 10, b"z" * 10)]),
            t.file("zeros", bytes(64 * 2**20)),
        ],
    )
    sparse = root / "sparse"
    assert sparse.stat().st_size == size and sparse.stat().st_blocks * 512 < 2**20
    with open(sparse, "rb") as f:
        f.seek(4090)
        assert f.read(110) == b"\0" * 6 + b"a" * 100 + b"\0" * 4
        f.seek(size - 10)
        assert f.read() == b"z" * 10
    zeros = root / "zeros"
    assert zeros.stat().st_size == 64 * 2**20 and zeros.stat().st_blocks * 512 < 2**20
    assert zeros.read_bytes() == bytes(64 * 2**20)
    assert report.hole_bytes >= size - 110 + 64 * 2**20


def test_total_size_and_entry_count_limits(root: Path) -> None:
    with pytest.raises(UnsafeLayer, match=r"'b'.*add up to more than 100 bytes"):
        apply(root, [t.file("a", b"x" * 60), t.file("b", b"y" * 60)], limits=Limits(max_bytes=100))
    with pytest.raises(UnsafeLayer, match="more than 3 entries"):
        apply(root, [t.file(f"f{i}") for i in range(5)], limits=Limits(max_entries=3))
    deep = "/".join(["d"] * 20)
    with pytest.raises(UnsafeLayer, match="deeper than 10"):
        apply(root, [t.file(f"{deep}/x")], limits=Limits(max_depth=10))


def test_duplicate_entries_last_one_wins(root: Path) -> None:
    apply(
        root,
        [
            t.file("x", b"first"),
            t.file("x", b"second", 0o600),
            t.directory("d"),
            t.file("d/child", b"c"),
            t.file("d", b"now a file"),
            t.file("f", b"file"),
            t.directory("f", 0o750),
            t.directory("keep"),
            t.file("keep/inner", b"i"),
            t.directory("keep", 0o700),
        ],
    )
    assert (root / "x").read_bytes() == b"second" and stat.S_IMODE((root / "x").stat().st_mode) == 0o600
    assert (root / "d").read_bytes() == b"now a file"
    assert (root / "f").is_dir() and stat.S_IMODE((root / "f").stat().st_mode) == 0o750
    # A directory over a directory keeps its children and takes the new metadata.
    assert (root / "keep/inner").read_bytes() == b"i" and stat.S_IMODE(
        (root / "keep").stat().st_mode
    ) == 0o700


def test_the_root_cannot_become_a_symlink(root: Path, outside: Path) -> None:
    with pytest.raises(UnsafeLayer, match="replace the root"):
        apply(root, [t.symlink("./", str(outside))])
    assert root.is_dir() and not root.is_symlink()


def test_symlink_loops_are_an_error_not_a_hang(root: Path) -> None:
    with pytest.raises(UnsafeLayer, match=r"'a/x'.*too many levels of symbolic links"):
        apply(root, [t.symlink("a", "b"), t.symlink("b", "a"), t.file("a/x")])


def test_a_file_as_parent_is_a_clear_error(root: Path) -> None:
    with pytest.raises(ImageError, match=r"'f/child'.*/f is not a directory"):
        apply(root, [t.file("f"), t.file("f/child")])


def test_truncated_and_corrupt_archives_are_clear_errors(root: Path) -> None:
    data = t.tar_bytes([t.file("big", b"x" * 5000)])
    with LayerApplier(root) as applier, pytest.raises(ImageError, match=r"'big'.*ends inside the file"):
        applier.apply(io.BytesIO(data[:2048]), "layer 0")
    with LayerApplier(root) as applier, pytest.raises(ImageError, match="not a tar archive"):
        applier.apply(io.BytesIO(b"\x01" * 4096), "layer 0")


def test_whiteouts_follow_the_oci_rules(root: Path) -> None:
    apply(
        root,
        [
            t.directory("etc"),
            t.file("etc/a"),
            t.file("etc/b"),
            t.directory("opq"),
            t.file("opq/lower"),
            t.directory("opq/sub"),
            t.file("opq/sub/deep"),
            t.directory("gone"),
            t.file("gone/x"),
        ],
        [
            t.whiteout("etc/a"),
            t.whiteout("etc/never-existed"),
            t.whiteout("gone"),
            t.directory("opq"),
            t.file("opq/upper-before", b"u"),
            t.opaque("opq"),
            t.file("opq/upper-after", b"u"),
            # A whiteout does not hide what its own layer added, even when it comes later.
            t.file("etc/same-layer", b"s"),
            t.whiteout("etc/same-layer"),
            t.file("./.wh...", b""),  # names ".." : ignored, not the parent
        ],
    )
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert names == ["etc", "etc/b", "etc/same-layer", "opq", "opq/upper-after", "opq/upper-before"]


def test_metadata_is_reproduced(root: Path) -> None:
    cap = bytes([0, 0, 0, 2, 0, 0x20, 0, 0] + [0] * 12)
    report = apply(
        root,
        [
            t.directory("dev", 0o755, mtime=1_600_000_000),
            t.Entry("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
            t.Entry("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0, gid=6),
            t.Entry("fifo", tarfile.FIFOTYPE, mode=0o640, uid=7, gid=8),
            t.file("suid", b"s", 0o4755, uid=0, gid=0),
            t.file("owned", b"o", 0o640, uid=1234, gid=5678, mtime=1_500_000_000.25),
            t.file("caps", b"c", 0o755, xattrs={"security.capability": cap, "user.note": b"\xff\x00bin"}),
            t.file("overlay", b"o", xattrs={"trusted.overlay.opaque": b"y", "security.selinux": b"x"}),
            t.symlink("link", "owned", uid=3, gid=4, mtime=1_400_000_000),
            t.hardlink("owned-link", "owned"),
        ],
    )
    null = (root / "dev/null").lstat()
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    sda = (root / "dev/sda").lstat()
    assert stat.S_ISBLK(sda.st_mode) and sda.st_gid == 6 and stat.S_IMODE(sda.st_mode) == 0o660
    fifo = (root / "fifo").lstat()
    assert stat.S_ISFIFO(fifo.st_mode) and (fifo.st_uid, fifo.st_gid) == (7, 8)
    assert stat.S_IMODE((root / "suid").stat().st_mode) == 0o4755
    owned = (root / "owned").stat()
    assert (owned.st_uid, owned.st_gid, owned.st_mtime_ns) == (1234, 5678, 1_500_000_000_250_000_000)
    assert owned.st_nlink == 2 and (root / "owned-link").stat().st_ino == owned.st_ino
    assert os.getxattr(root / "caps", "security.capability") == cap
    assert os.getxattr(root / "caps", "user.note") == b"\xff\x00bin"
    assert os.listxattr(root / "overlay") == []
    assert sum("trusted.overlay.opaque" in w or "security.selinux" in w for w in report.warnings) == 2
    link = (root / "link").lstat()
    assert (link.st_uid, link.st_gid, int(link.st_mtime)) == (3, 4, 1_400_000_000)
    assert (root / "dev").stat().st_mtime == 1_600_000_000  # restored after its children were made
