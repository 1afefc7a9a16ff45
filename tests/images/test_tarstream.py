"""The streaming tar reader agrees with Python's tarfile and with GNU tar on every format layers use."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tartarus.images.layers import LayerApplier
from tartarus.images.tarstream import TarError, TarReader

LONG = "d" * 120 + "/" + "n" * 130


def _entries() -> list[tuple[tarfile.TarInfo, bytes]]:
    out: list[tuple[tarfile.TarInfo, bytes]] = []

    def add(name: str, type_: bytes = tarfile.REGTYPE, data: bytes = b"", **kw: object) -> None:
        info = tarfile.TarInfo(name)
        info.type = type_
        info.size = len(data)
        info.mtime = 1_700_000_123
        for key, value in kw.items():
            setattr(info, key, value)
        out.append((info, data))

    add("./", tarfile.DIRTYPE, mode=0o755)
    add("etc", tarfile.DIRTYPE, mode=0o755)
    add("etc/passwd", data=b"root:x:0:0\n" * 100, mode=0o644)
    add("exact-block", data=b"b" * 1024)
    add("empty")
    add("bin/su", data=b"su", mode=0o4755)
    add("link", tarfile.SYMTYPE, linkname="etc/passwd", mode=0o777)
    add("hard", tarfile.LNKTYPE, linkname="etc/passwd")
    add("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
    add("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660)
    add("fifo", tarfile.FIFOTYPE, mode=0o600)
    add("owned", data=b"o", uid=1000, gid=1001)
    add("a/" * 40 + "prefix-split-name", data=b"p")  # > 100 chars: ustar prefix, GNU L, PAX path
    return out


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_headers_and_data_match_tarfile(fmt: int) -> None:
    entries = _entries()
    if fmt != tarfile.USTAR_FORMAT:
        entries.append((_info(LONG, tarfile.SYMTYPE, linkname="t" * 200), b""))
        entries.append((_info("big-ids", uid=2**31 + 5, gid=2**22), b"x"))
    if fmt == tarfile.PAX_FORMAT:
        unicode = _info("unicodé/名前")
        unicode.pax_headers = {"mtime": "1700000000.123456789"}  # exact: tarfile would round a float
        entries.append((unicode, b"u"))
        info = _info("xattrs")
        info.pax_headers = {"SCHILY.xattr.user.a": "1", "SCHILY.xattr.security.capability": "\udcff\x00\x02"}
        entries.append((info, b""))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    raw = buf.getvalue()
    expected = []
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        for m in tf:
            f = tf.extractfile(m) if m.isreg() else None
            expected.append((m, f.read() if f else b""))
    reader = TarReader(io.BytesIO(raw))
    got = []
    while (member := reader.next()) is not None:
        got.append((member, reader.read(1 << 30) if member.isreg() else b""))
    assert len(got) == len(expected)
    for (ours, data), (theirs, their_data) in zip(got, expected, strict=True):
        assert ours.name == (theirs.name if theirs.name != "." else "."), theirs.name
        assert ours.type == (theirs.type if theirs.type != tarfile.AREGTYPE else b"\0")
        assert (ours.mode, ours.uid, ours.gid) == (theirs.mode, theirs.uid, theirs.gid), theirs.name
        assert (ours.linkname, ours.devmajor, ours.devminor) == (
            theirs.linkname,
            theirs.devmajor,
            theirs.devminor,
        )
        assert ours.mtime_ns // 10**9 == int(theirs.mtime)
        assert data == their_data
        for key, value in theirs.pax_headers.items():
            if key.startswith("SCHILY.xattr."):
                assert ours.xattrs[key[13:]] == value.encode("utf-8", "surrogateescape")
    if fmt == tarfile.PAX_FORMAT:
        assert next(m for m, _ in got if m.name == "unicodé/名前").mtime_ns == 1_700_000_000_123456789


def _info(name: str, type_: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.mtime = 1_700_000_000
    for key, value in kw.items():
        setattr(info, key, value)
    if info.isreg() and "size" not in kw:
        info.size = 1 if name == "big-ids" or name.startswith("unicod") else 0
    return info


@pytest.mark.parametrize(
    "options",
    [["--format=gnu"], ["--format=posix", "--sparse-version=0.0"], ["--format=posix", "--sparse-version=0.1"],
     ["--format=posix", "--sparse-version=1.0"]],
    ids=["gnu-old", "pax-0.0", "pax-0.1", "pax-1.0"],
)  # fmt: skip
def test_gnu_tar_sparse_files_in_every_format(tmp_path: Path, options: list[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sparse = src / "sparse.img"
    with open(sparse, "wb") as f:
        for offset in (0, 3 << 20, 40 << 20):  # more regions than the old GNU header holds inline
            f.seek(offset)
            f.write(os.urandom(5000))
        for i in range(6):
            f.seek((50 + i * 2) << 20)
            f.write(b"r" * 100)
        f.truncate(80 << 20)
    archive = tmp_path / "layer.tar"
    subprocess.run(["tar", "--sparse", *options, "-C", str(src), "-cf", str(archive), "."], check=True)
    root = tmp_path / "root"
    root.mkdir()
    with open(archive, "rb") as f, LayerApplier(root) as applier:
        applier.apply(f, "layer")
    out = root / "sparse.img"
    assert out.stat().st_size == sparse.stat().st_size
    assert out.read_bytes() == sparse.read_bytes()
    assert out.stat().st_blocks * 512 < 2 << 20


def test_corrupt_headers_are_errors() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("f")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    raw = bytearray(buf.getvalue())
    raw[0] ^= 0x20  # the name changes, the checksum no longer matches
    with pytest.raises(TarError, match="checksum"):
        TarReader(io.BytesIO(bytes(raw))).next()
    with pytest.raises(TarError, match="ends inside a header"):
        TarReader(io.BytesIO(buf.getvalue()[:300])).next()
