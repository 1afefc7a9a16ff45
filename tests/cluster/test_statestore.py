"""Sandbox state in a real S3 store (SeaweedFS started by the session fixture on loopback): round trips,
dedup across captures, bounded streaming, and integrity on download."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tartarus.cluster.chunks import ChunkRef, seal
from tartarus.cluster.errors import ChunkCorrupt, ManifestInvalid, ObjectMissing
from tartarus.cluster.manifest import manifest_key
from tartarus.cluster.objects import ObjectStore
from tartarus.cluster.statestore import StateStore
from tartarus.errors import Conflict

CHUNK = 256 * 1024


def _file(path: Path, parts: list[bytes]) -> Path:
    path.write_bytes(b"".join(parts))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_of_a_capture(objects: ObjectStore, tmp_path: Path) -> None:
    memory = _file(tmp_path / "memory.state", [os.urandom(CHUNK), bytes(CHUNK * 3), os.urandom(1000)])
    layer = _file(tmp_path / "layer.ext4", [os.urandom(CHUNK * 2)])
    empty = _file(tmp_path / "empty", [])
    store = StateStore(objects, chunk_size=CHUNK, workers=3)
    up = store.upload("cap1", [("memory.state", memory), ("layer.ext4", layer), ("empty", empty)])
    # memory: random, zero, zero, zero, tail -> the zero chunk is stored once
    assert up.chunks == 7 and up.uploaded == 5
    assert up.raw_bytes == memory.stat().st_size + layer.stat().st_size
    assert up.sent_bytes < up.raw_bytes  # the zero chunk compressed to almost nothing
    out = tmp_path / "out"
    down = store.download("cap1", out)
    assert down.raw_bytes == up.raw_bytes
    assert sorted(p.name for p in out.iterdir()) == ["empty", "layer.ext4", "memory.state"]
    for f in (memory, layer, empty):
        assert _sha(out / f.name) == _sha(f)


def test_chunks_are_shared_across_captures(objects: ObjectStore, tmp_path: Path) -> None:
    base = [os.urandom(CHUNK) for _ in range(6)]
    first = _file(tmp_path / "a", base)
    second = _file(tmp_path / "b", [*base[:5], os.urandom(CHUNK)])  # one page region changed
    store = StateStore(objects, chunk_size=CHUNK)
    assert store.upload("c1", [("memory.state", first)]).uploaded == 6
    again = store.upload("c2", [("memory.state", second)])
    assert (again.chunks, again.uploaded) == (6, 1)
    store.download("c2", tmp_path / "out")
    assert _sha(tmp_path / "out" / "memory.state") == _sha(second)
    with pytest.raises(Conflict):
        store.upload("c1", [("memory.state", first)])


def test_a_corrupt_chunk_fails_the_download_and_leaves_nothing(objects: ObjectStore, tmp_path: Path) -> None:
    data = [os.urandom(CHUNK) for _ in range(4)]
    src = _file(tmp_path / "memory.state", data)
    other = _file(tmp_path / "layer.ext4", [os.urandom(CHUNK)])
    store = StateStore(objects, chunk_size=CHUNK)
    store.upload("cap", [("layer.ext4", other), ("memory.state", src)])
    victim = ChunkRef(hashlib.sha256(data[2]).hexdigest(), CHUNK)
    out = tmp_path / "out"
    objects.put(victim.key, seal(os.urandom(CHUNK)).blob)  # valid zstd, wrong content
    with pytest.raises(ChunkCorrupt, match=victim.digest):
        store.download("cap", out)
    assert list(out.iterdir()) == []  # neither the complete first file nor a partial second one
    objects.put(victim.key, b"\x00garbage")
    with pytest.raises(ChunkCorrupt, match="decompress"):
        store.download("cap", out)
    assert list(out.iterdir()) == []


def test_missing_objects_and_bad_manifests_are_clear_errors(objects: ObjectStore, tmp_path: Path) -> None:
    store = StateStore(objects, chunk_size=CHUNK)
    with pytest.raises(ObjectMissing):
        store.download("never-uploaded", tmp_path / "out")
    objects.put(manifest_key("bad"), b'{"format": 1, "capture": "bad"}')
    with pytest.raises(ManifestInvalid):
        store.download("bad", tmp_path / "out")
    src = _file(tmp_path / "f", [os.urandom(CHUNK)])
    store.upload("ok", [("f", src)])
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "f").write_text("mine")
    with pytest.raises(Conflict, match="not overwriting"):
        store.download("ok", tmp_path / "dest")
    assert (tmp_path / "dest" / "f").read_text() == "mine"


def test_memory_stays_bounded_whatever_the_file_size(objects: ObjectStore, tmp_path: Path) -> None:
    """A 48 MiB capture in 1 MiB chunks with 2 workers: Python's peak allocation stays a few chunks deep
    (window = 2 x workers), far below the file size, both ways."""
    import tracemalloc

    src = tmp_path / "memory.state"
    with open(src, "wb") as f:
        for _ in range(48):
            f.write(os.urandom(1 << 20))
    store = StateStore(objects, chunk_size=1 << 20, workers=2)
    peaks = []
    for action in (
        lambda: store.upload("big", [("memory.state", src)]),
        lambda: store.download("big", tmp_path / "out"),
    ):
        tracemalloc.start()
        try:
            action()
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert all(p < 16 << 20 for p in peaks), [p >> 20 for p in peaks]
    assert _sha(tmp_path / "out" / "memory.state") == _sha(src)


def test_a_sparse_file_stays_sparse_both_ways(objects: ObjectStore, tmp_path: Path) -> None:
    """A writable layer is gigabytes of holes around a few MiB of data: the holes are neither read nor
    fetched, and the downloaded copy has holes where the original had them."""
    layer = tmp_path / "layer.ext4"
    data = [os.urandom(CHUNK), os.urandom(CHUNK // 2)]
    with open(layer, "wb") as f:
        f.truncate(CHUNK * 400)
        f.seek(CHUNK * 3)
        f.write(data[0])
        f.seek(CHUNK * 399 + 100)
        f.write(data[1])
    store = StateStore(objects, chunk_size=CHUNK)
    up = store.upload("sparse", [("layer.ext4", layer)])
    assert up.chunks == 400 and up.uploaded == 3  # two with data, one zero chunk for all the holes
    down = store.download("sparse", tmp_path / "out")
    copy = tmp_path / "out" / "layer.ext4"
    assert copy.stat().st_size == layer.stat().st_size and _sha(copy) == _sha(layer)
    assert copy.stat().st_blocks * 512 < 4 * CHUNK  # not 100 MiB of written zeros
    assert down.fetched_bytes < 3 * CHUNK
