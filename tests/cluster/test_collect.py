"""Collecting the object store, on the suite's real PostgreSQL and S3 store: captures nothing names go
with the chunks only they used; named captures, template snapshots and anything within the grace period
stay and still download whole; an upload re-writes an old chunk it deduplicates against."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tartarus.cluster import checkpoints
from tartarus.cluster.checkpoints import StoredCheckpoint
from tartarus.cluster.collect import collect
from tartarus.cluster.db import Connection
from tartarus.cluster.manifest import manifest_key
from tartarus.cluster.objects import ObjectStore, S3Config
from tartarus.cluster.statestore import StateStore
from tests.served import TARTARUS

CHUNK = 64 * 1024


def _checkpoint(capture: str) -> StoredCheckpoint:
    return StoredCheckpoint(
        id="ck-kept",
        tenant="alpha",
        sandbox_id="sb-1",
        template="python-ds",
        node="node-a",
        capture=capture,
        vcpus=1,
        memory_mib=512,
        captured_at=1.0,
        disk_bytes=CHUNK,
        ttl_s=None,
    )


def test_unnamed_captures_and_their_own_chunks_are_collected(
    conn: Connection, objects: ObjectStore, tmp_path: Path
) -> None:
    shared, mine, theirs, snap = (os.urandom(CHUNK) for _ in range(4))
    (tmp_path / "kept").write_bytes(shared + mine)
    (tmp_path / "gone").write_bytes(shared + theirs)
    (tmp_path / "snap").write_bytes(snap)
    store = StateStore(objects, chunk_size=CHUNK)
    kept = store.upload("ck-kept.aa", [("memory.state", tmp_path / "kept")])
    gone = store.upload("sb-gone.bb", [("memory.state", tmp_path / "gone")])
    store.upload("snapshot-0123abcd", [("memory", tmp_path / "snap")])
    checkpoints.record(conn, _checkpoint("ck-kept.aa"))

    # Within the grace period nothing goes: the unnamed capture may be an upload not yet recorded.
    assert collect(conn, objects, grace_s=3600).captures == ()
    assert objects.exists(manifest_key("sb-gone.bb"))

    later = datetime.now(UTC) + timedelta(hours=2)
    done = collect(conn, objects, grace_s=3600, now=later)
    assert done.captures == ("sb-gone.bb",)
    assert done.chunks == 1  # `theirs` only: `shared` is named by the kept capture too
    assert not objects.exists(manifest_key("sb-gone.bb"))
    only_theirs = (gone.manifest.chunk_refs - kept.manifest.chunk_refs).pop()
    assert not objects.exists(only_theirs.key)
    assert objects.exists(manifest_key("snapshot-0123abcd"))
    out = tmp_path / "out"
    store.download("ck-kept.aa", out)
    assert (out / "memory.state").read_bytes() == shared + mine
    store.download("snapshot-0123abcd", tmp_path / "snap-out")

    # Its row deleted, the checkpoint's capture goes next time.
    checkpoints.remove(conn, "ck-kept", None)
    assert collect(conn, objects, grace_s=3600, now=later).captures == ("ck-kept.aa",)


def test_an_upload_writes_again_an_old_chunk_it_deduplicates_against(
    objects: ObjectStore, tmp_path: Path
) -> None:
    data = os.urandom(CHUNK)
    (tmp_path / "f").write_bytes(data)
    StateStore(objects, chunk_size=CHUNK).upload("one.aa", [("f", tmp_path / "f")])
    fresh = StateStore(objects, chunk_size=CHUNK).upload("two.bb", [("f", tmp_path / "f")])
    assert fresh.uploaded == 0  # deduplicated: the chunk is recent
    # With a refresh time shorter than the chunk's age, the chunk is written again (a collection's grace
    # period counts from then).
    again = StateStore(objects, chunk_size=CHUNK, refresh_s=1e-6).upload("three.cc", [("f", tmp_path / "f")])
    assert again.uploaded == 1 and again.sent_bytes > 0


def test_nodes_collect_runs_a_collection(
    cluster_url: str, objects: ObjectStore, s3_config: S3Config, tmp_path: Path
) -> None:
    (tmp_path / "f").write_bytes(os.urandom(CHUNK))
    StateStore(objects, chunk_size=CHUNK).upload("sb-gone.aa", [("f", tmp_path / "f")])
    env = {
        **os.environ,
        "TARTARUS_DATABASE_URL": cluster_url,
        "TARTARUS_S3_ENDPOINT": s3_config.endpoint,
        "TARTARUS_S3_BUCKET": objects.config.bucket,
        "TARTARUS_S3_ACCESS_KEY": s3_config.access_key,
        "TARTARUS_S3_SECRET_KEY": s3_config.secret_key,
    }
    run = subprocess.run(
        [str(TARTARUS), "nodes", "collect", "--grace", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "deleted 1 captures and 1 chunks" in run.stdout
    assert not objects.exists(manifest_key("sb-gone.aa"))
