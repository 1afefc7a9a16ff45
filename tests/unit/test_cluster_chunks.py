"""Chunking, sealing and the capture manifest format (pure; the S3 round trips are in tests/cluster)."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from tartarus.cluster.chunks import ChunkRef, seal, split, unseal
from tartarus.cluster.errors import ChunkCorrupt, ManifestInvalid
from tartarus.cluster.manifest import FileEntry, Manifest, manifest_key
from tartarus.errors import InvalidArgument


class Trickle(io.RawIOBase):
    """A stream that returns at most 1000 bytes per read, like a pipe."""

    def __init__(self, data: bytes) -> None:
        self.data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self.data.read(min(n, 1000) if n > 0 else 1000)


def test_split_yields_full_chunks_then_the_rest_even_from_short_reads() -> None:
    data = os.urandom(10_000)
    for stream in (io.BytesIO(data), Trickle(data)):
        pieces = list(split(stream, 4096))  # type: ignore[arg-type]
        assert [len(p) for p in pieces] == [4096, 4096, 1808]
        assert b"".join(pieces) == data
    assert list(split(io.BytesIO(b""), 4096)) == []
    assert [len(p) for p in split(io.BytesIO(bytes(8192)), 4096)] == [4096, 4096]


def test_seal_names_a_chunk_by_the_sha256_of_its_raw_bytes_and_compresses() -> None:
    raw = bytes(1 << 20)
    sealed = seal(raw)
    assert sealed.ref == ChunkRef(hashlib.sha256(raw).hexdigest(), len(raw))
    assert len(sealed.blob) < 1000  # a zero page compresses to almost nothing
    assert sealed.ref.key == f"chunks/{sealed.ref.digest[:2]}/{sealed.ref.digest}.zst"
    assert unseal(sealed.ref, sealed.blob) == raw


def test_unseal_refuses_garbage_and_a_valid_blob_of_other_content() -> None:
    good = seal(b"a" * 5000)
    other = seal(b"b" * 5000)
    with pytest.raises(ChunkCorrupt, match="does not decompress"):
        unseal(good.ref, b"not zstd at all")
    with pytest.raises(ChunkCorrupt, match="SHA-256"):
        unseal(good.ref, other.blob)
    with pytest.raises(ChunkCorrupt):  # longer than the manifest says: refused, not read unbounded
        unseal(ChunkRef(good.ref.digest, 10), good.blob)


def test_manifest_round_trips_and_is_canonical() -> None:
    a, b = seal(b"x" * 10), seal(b"y" * 5)
    m = Manifest("cap-1", 4096, (FileEntry("memory.state", 15, (a.ref, b.ref)), FileEntry("empty", 0, ())))
    assert Manifest.parse(m.to_bytes()) == m
    assert m.to_bytes() == Manifest.parse(m.to_bytes()).to_bytes()
    assert m.chunk_refs == {a.ref, b.ref}
    assert manifest_key("cap-1") == "manifests/cap-1.json"


def _doc(files: str, capture: str = '"c"', chunk_size: str = "1", fmt: int = 1) -> bytes:
    text = f'{{"format": {fmt}, "capture": {capture}, "chunk_size": {chunk_size}, "files": [{files}]}}'
    return text.encode()


@pytest.mark.parametrize(
    "doc",
    [
        b"not json",
        b"[]",
        _doc("", fmt=2),
        _doc('{"name": "../x", "size": 0, "chunks": []}'),  # a path, not a file name
        _doc('{"name": "f", "size": 3, "chunks": []}'),  # chunks do not add up to the size
        _doc('{"name": "f", "size": 1, "chunks": [["zz", 1]]}'),  # not a SHA-256
        _doc("", capture='"c/d"'),
        _doc("", chunk_size="true"),
    ],
)
def test_bad_manifests_are_refused_with_a_clear_error(doc: bytes) -> None:
    with pytest.raises(ManifestInvalid, match="manifest"):
        Manifest.parse(doc)


def test_file_names_and_capture_ids_are_plain_names() -> None:
    with pytest.raises(InvalidArgument):
        FileEntry("a/b", 0, ())
    with pytest.raises(InvalidArgument):
        manifest_key("../../x")
    e = FileEntry("f", 0, ())
    with pytest.raises(InvalidArgument, match="twice"):
        Manifest("c", 1, (e, e))
