"""Layer application: OCI semantics, and hostile archives that must never touch anything outside the root.

Each hostile case checks both halves of the contract: the violation is neutralised (with a warning naming
the entry) or fails with an error naming the entry, and the canaries beside the root are unchanged. The
archives aim at canaries this test makes, never at the machine's files, and every layer is applied in a
jail (tests/images/jail.py) where only the test's work area is writable: with the escape guard broken,
the tests fail and the machine is untouched.
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
from tests.images.jail import jailed
from tests.images.treecmp import Snapshot, snapshot


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The jail's only writable directory: the root and the `outside` canaries live here."""
    w = tmp_path / "work"
    w.mkdir()
    return w


@pytest.fixture
def outside(work: Path) -> Path:
    """A tree next to the root, writable in the jail, that no layer may modify: work/outside/{file,dir/}."""
    out = work / "outside"
    (out / "dir").mkdir(parents=True)
    (out / "file").write_text("precious\n")
    return out


@pytest.fixture
def sealed(tmp_path: Path) -> Path:
    """Canaries outside the jail's writable area (stand-ins for the machine's files): a broken guard
    reaching them fails with EROFS instead of changing them."""
    out = tmp_path / "sealed"
    (out / "dir").mkdir(parents=True)
    (out / "passwd").write_text("root:x:0:0:sealed\n")
    return out


@pytest.fixture
def root(work: Path) -> Path:
    r = work / "deep" / "er" / "root"
    r.mkdir(parents=True)
    return r


def apply_archives(root: Path, archives: list[bytes], limits: Limits | None) -> ApplyReport:
    with LayerApplier(root, limits) as applier:
        for i, archive in enumerate(archives):
            applier.apply(io.BytesIO(archive), f"layer {i}")
        return applier.finish()


def apply(root: Path, *layers: list[t.Entry], limits: Limits | None = None) -> ApplyReport:
    """Apply `layers` to `root` in the jail, whose writable area is the `work` directory above it."""
    archives = [t.tar_bytes(entries) for entries in layers]
    return jailed([root.parents[2]], apply_archives, root, archives, limits)


def everything_but(tmp_path: Path, root: Path) -> Snapshot:
    snap = snapshot(tmp_path)
    rel = "/" + str(root.relative_to(tmp_path))
    return {k: v for k, v in snap.items() if k != rel and not k.startswith(rel + "/") and k != "/"}


def test_dotdot_and_absolute_paths_are_clamped_inside_the_root(
    tmp_path: Path, root: Path, outside: Path, sealed: Path
) -> None:
    before = everything_but(tmp_path, root)
    report = apply(
        root,
        [
            t.file("../../../escape-dotdot", b"1"),
            t.file("/abs-escape", b"2"),
            t.file("a/../../../b", b"3"),
            t.file(f"{outside}/file", b"4"),
            t.file(f"{sealed}/passwd", b"5"),
            t.file("../" * 15 + str(sealed / "dir" / "new").lstrip("/"), b"6"),
        ],
    )
    assert everything_but(tmp_path, root) == before
    assert (root / "escape-dotdot").read_bytes() == b"1"
    assert (root / "abs-escape").read_bytes() == b"2"
    assert (root / "b").read_bytes() == b"3"
    assert (root / str(outside).lstrip("/") / "file").read_bytes() == b"4"
    assert (root / str(sealed).lstrip("/") / "passwd").read_bytes() == b"5"
    assert (root / str(sealed).lstrip("/") / "dir" / "new").read_bytes() == b"6"
    assert any("'../../../escape-dotdot'" in w and "outside" in w for w in report.warnings)
    assert any("'/abs-escape'" in w for w in report.warnings)


def test_writing_through_a_symlink_that_points_outside_stays_inside(
    tmp_path: Path, root: Path, outside: Path, sealed: Path
) -> None:
    before = everything_but(tmp_path, root)
    apply(
        root,
        [
            t.symlink("abs", str(outside)),
            t.symlink("rel", "../../../../../../../../" + str(outside).lstrip("/")),
            t.symlink("rel-odd", "../../../../../../../../../" + str(outside).lstrip("/")),
            t.symlink("rootlink", "/"),
            t.symlink("chain", "abs"),
            t.symlink("sealed-abs", str(sealed)),
        ],
        [
            t.file("abs/file", b"overwritten?"),
            t.file("rel/dir/new", b"created?"),
            t.file("rel-odd/dir/odd", b"odd?"),
            t.file("rootlink" + str(sealed / "passwd"), b"root::0:0::/:/bin/sh\n"),
            t.file("chain/dir/chained", b"x"),
            t.file("sealed-abs/dir/new", b"sealed?"),
        ],
    )
    assert everything_but(tmp_path, root) == before
    inside = root / str(outside).lstrip("/")
    assert (inside / "file").read_bytes() == b"overwritten?"
    assert (inside / "dir" / "new").read_bytes() == b"created?"
    assert (inside / "dir" / "chained").read_bytes() == b"x"
    assert (inside / "dir" / "odd").read_bytes() == b"odd?"
    inside_sealed = root / str(sealed).lstrip("/")
    assert (inside_sealed / "passwd").read_bytes().startswith(b"root::")
    assert (inside_sealed / "dir" / "new").read_bytes() == b"sealed?"
    assert os.readlink(root / "abs") == str(outside)  # the symlink itself is kept as the image says


def test_an_existing_symlink_is_replaced_never_written_through(
    tmp_path: Path, root: Path, outside: Path, sealed: Path
) -> None:
    before = everything_but(tmp_path, root)
    apply(
        root,
        [
            t.symlink("victim", str(outside / "file")),
            t.symlink("victim-dir", str(outside / "dir")),
            t.symlink("sealed-victim", str(sealed / "passwd")),
        ],
        [
            t.file("victim", b"new content"),
            t.file("sealed-victim", b"new content"),
            t.directory("victim-dir", 0o700),
            t.symlink("same-layer", str(outside / "file")),
            t.file("same-layer", b"dup"),
        ],
    )
    assert everything_but(tmp_path, root) == before
    assert (outside / "file").read_text() == "precious\n"
    assert not (root / "victim").is_symlink() and (root / "victim").read_bytes() == b"new content"
    assert not (root / "sealed-victim").is_symlink()
    assert (root / "victim-dir").is_dir() and not (root / "victim-dir").is_symlink()
    assert (root / "same-layer").read_bytes() == b"dup"


def test_hard_links_out_of_the_root_fail_with_the_entry_named(
    tmp_path: Path, root: Path, outside: Path, sealed: Path
) -> None:
    before = everything_but(tmp_path, root)
    up = "../" * 3  # root -> er -> deep -> work (odd: a guard that lets one `..` out is caught too)
    with pytest.raises(UnsafeLayer, match=r"'hl'.*'\.\./\.\./\.\./outside/file' does not exist"):
        apply(root, [t.hardlink("hl", up + "outside/file")])
    with pytest.raises(UnsafeLayer, match=r"'hl2'.*does not exist"):
        apply(root, [t.symlink("sl", str(outside)), t.hardlink("hl2", "sl/file")])
    with pytest.raises(UnsafeLayer, match=r"'hl3'.*does not exist"):
        apply(root, [t.hardlink("hl3", str(sealed / "passwd"))])
    with pytest.raises(UnsafeLayer, match=r"'hl4'.*does not exist"):
        apply(root, [t.symlink("up", ".."), t.hardlink("hl4", "up/root/../../../outside/file")])
    assert everything_but(tmp_path, root) == before
    assert (outside / "file").stat().st_nlink == 1 and (sealed / "passwd").stat().st_nlink == 1
    # With the target present *inside* the root, the clamped link is made to it.
    apply(root, [t.directory("etc"), t.file("etc/passwd", b"inside\n"), t.hardlink("hl5", "/../etc/passwd")])
    assert (root / "hl5").stat().st_ino == (root / "etc/passwd").stat().st_ino


def test_dotdot_at_the_root_stays_at_the_root_whatever_the_number_of_levels(
    tmp_path: Path, root: Path, outside: Path
) -> None:
    """An odd number of levels above the root is what catches a `..` that opens the root's parent: an
    even one would climb out and back in."""
    before = everything_but(tmp_path, root)
    links = [t.symlink(f"up{n}", "/".join([".."] * n)) for n in range(1, 6)]
    links += [t.symlink("abs-up", "/.."), t.directory("d"), t.symlink("d/up", "../../..")]
    writes = [t.file(f"up{n}/escape{n}", b"x") for n in range(1, 6)]
    writes += [t.file("abs-up/escape-abs", b"x"), t.file("d/up/escape-d", b"x")]
    writes += [t.file("up1/er/root/../../../outside/file", b"through the parent?")]
    apply(root, links, writes)
    assert everything_but(tmp_path, root) == before
    assert (outside / "file").read_text() == "precious\n"
    for name in [*(f"escape{n}" for n in range(1, 6)), "escape-abs", "escape-d"]:
        assert (root / name).read_bytes() == b"x", name


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


def test_the_root_cannot_become_a_symlink(root: Path, outside: Path, sealed: Path) -> None:
    with pytest.raises(UnsafeLayer, match="replace the root"):
        apply(root, [t.symlink("./", str(outside))])
    with pytest.raises(UnsafeLayer, match="replace the root"):
        apply(root, [t.symlink("./", str(sealed)), t.file("passwd", b"x")])
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
