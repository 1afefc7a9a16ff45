"""Checkpoints in the object store, with real parts: the suite's PostgreSQL, SeaweedFS on loopback, two
`tartarus agent` processes with the store and two gateways (the `cluster` fixture of test_stored); real VMs.

A checkpoint taken through one gateway is a row of the cluster and a capture in the bucket: sandboxes start
from it on a node that never had it (its node killed), with its Python variables and files; a fork is
placed; a capture with a corrupt or missing chunk is a clear error and leaves nothing on any node; a node
whose cache has no template snapshot fetches the one another node uploaded instead of building its own.
"""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import httpx
import pytest

from tartarus.cluster import checkpoints
from tartarus.cluster.db import connect
from tartarus.cluster.manifest import manifest_key
from tartarus.cluster.membership import Membership
from tartarus.cluster.objects import ObjectStore, S3Config
from tartarus.cluster.statestore import StateStore
from tartarus.paths import cache_dir
from tartarus.roles.snapshot_sync import capture_of
from tartarus.roles.stored import fingerprint
from tartarus.sdk import Sandbox
from tartarus.snapshots.snapshot import find_snapshot, snapshot_key
from tartarus.templates.built import get_template
from tests.cluster.roles import Role
from tests.cluster.test_stored import LEASE_S, Cluster, _auth, cluster  # noqa: F401  (the module's fixture)
from tests.conftest import wait_until

pytestmark = pytest.mark.usefixtures("cluster")


def _gw(c: Cluster, i: int) -> httpx.Client:
    return httpx.Client(base_url=c.gateways[i].url, headers=_auth(c), timeout=300)


def _prepare(sb: Sandbox) -> None:
    assert sb.run_code("answer = 6 * 7\nwords = ['copied'] * 2").error is None
    sb.files.write("/root/note.txt", b"written before the checkpoint")


def _intact(sb: Sandbox) -> None:
    assert sb.run_code("answer").result == "42"
    assert sb.run_code("' '.join(words)").result == "'copied copied'"
    assert sb.files.read("/root/note.txt") == b"written before the checkpoint"


def _local(c: Cluster, node: str, cid: str) -> bool:
    return (c.agents[node].state / "checkpoints" / cid).exists()


def _placements(c: Cluster) -> set[str]:
    with connect(c.url) as conn:
        return {str(r[0]) for r in conn.execute("SELECT sandbox_id FROM cluster.placements")}


def test_a_checkpoint_starts_sandboxes_on_a_node_that_never_had_it(cluster: Cluster) -> None:  # noqa: F811
    sb = Sandbox.create("python-ds", url=cluster.gateways[0].url, api_key=cluster.key)
    home = cluster.where(sb.id).node
    other = next(n for n in cluster.agents if n != home)
    made: list[str] = []
    try:
        _prepare(sb)
        with _gw(cluster, 0) as gw:
            taken = gw.post(f"/v1/sandboxes/{sb.id}/checkpoints", json={})
        assert taken.status_code == 201, taken.text
        cid = taken.json()["id"]
        with connect(cluster.url) as conn:
            row = checkpoints.find(conn, cid, None)
        assert row.node == home and row.sandbox_id == sb.id
        assert _local(cluster, home, cid) and not _local(cluster, other, cid)
        with _gw(cluster, 1) as gw:
            listed = gw.get("/v1/checkpoints").json()["checkpoints"]
            assert [c["id"] for c in listed] == [cid]
            assert gw.get(f"/v1/checkpoints/{cid}").json()["sandbox_id"] == sb.id

        # A fork through the other gateway: placed, with the memory and files; its checkpoint goes away.
        with _gw(cluster, 1) as gw:
            forked = gw.post(f"/v1/sandboxes/{sb.id}/fork", json={"count": 1})
            assert forked.status_code == 201, forked.text
            (copy,) = forked.json()["sandboxes"]
            made.append(copy["id"])
            assert [c["id"] for c in gw.get("/v1/checkpoints").json()["checkpoints"]] == [cid]
        _intact(Sandbox.connect(copy["id"], url=cluster.gateways[0].url, api_key=cluster.key))
        assert cluster.where(copy["id"]).node in cluster.agents

        cluster.agents[home].stop(signal.SIGKILL)
        with connect(cluster.url) as conn:
            members = Membership(conn)
            assert wait_until(lambda: not members.node(home).healthy, timeout=30)
        with _gw(cluster, 1) as gw:
            started = gw.post(f"/v1/checkpoints/{cid}/sandboxes", json={})
        assert started.status_code == 201, started.text
        new_id = started.json()["id"]
        made.append(new_id)
        assert cluster.where(new_id).node == other
        assert _local(cluster, other, cid)  # fetched from the store
        _intact(Sandbox.connect(new_id, url=cluster.gateways[1].url, api_key=cluster.key))

        with _gw(cluster, 0) as gw:
            assert gw.delete(f"/v1/checkpoints/{cid}").status_code == 204
            assert gw.get(f"/v1/checkpoints/{cid}").status_code == 404
            assert gw.post(f"/v1/checkpoints/{cid}/sandboxes", json={}).status_code == 404
        assert not _local(cluster, other, cid)
    finally:
        for sandbox_id in made:
            with contextlib.suppress(Exception):
                Sandbox.connect(sandbox_id, url=cluster.gateways[0].url, api_key=cluster.key).kill()
        if cluster.agents[home].proc.poll() is not None:
            cluster.start_agent(home)
        with contextlib.suppress(Exception):
            Sandbox.connect(sb.id, url=cluster.gateways[0].url, api_key=cluster.key).kill()


def test_a_corrupt_or_missing_chunk_is_a_clear_error_and_leaves_nothing(
    cluster: Cluster,  # noqa: F811
    s3_config: S3Config,
) -> None:
    sb = Sandbox.create("python-ds", url=cluster.gateways[0].url, api_key=cluster.key)
    try:
        _prepare(sb)
        with _gw(cluster, 0) as gw:
            taken = gw.post(f"/v1/sandboxes/{sb.id}/checkpoints", json={})
        assert taken.status_code == 201, taken.text
        cid = taken.json()["id"]
        home = cluster.where(sb.id).node
        # The node that took it drops its copy: any node placed must fetch it from the store.
        direct = {"Authorization": f"Bearer {cluster.token}", "x-tartarus-caller": "test local admin"}
        dropped = httpx.delete(f"{cluster.agents[home].url}/v1/checkpoints/{cid}", headers=direct)
        assert dropped.status_code == 204, dropped.text
        with connect(cluster.url) as conn:
            capture = checkpoints.find(conn, cid, None).capture
        objects = _store(cluster, s3_config)
        manifest = StateStore(objects).manifest(capture)
        # The first chunk of its memory state: device state and its own pages, shared with no other capture.
        chunk = next(f.chunks[0] for f in manifest.files if f.name == "memory.state")
        before = _placements(cluster)

        objects.put(chunk.key, b"not the chunk")
        with _gw(cluster, 1) as gw:
            corrupt = gw.post(f"/v1/checkpoints/{cid}/sandboxes", json={})
        assert corrupt.status_code == 502, corrupt.text
        assert corrupt.json()["error"]["code"] == "chunk_corrupt"
        assert chunk.digest in corrupt.json()["error"]["message"]
        _nothing_left(cluster, cid, before)

        objects.delete(chunk.key)
        with _gw(cluster, 1) as gw:
            missing = gw.post(f"/v1/checkpoints/{cid}/sandboxes", json={})
        assert missing.status_code == 404, missing.text
        assert missing.json()["error"]["code"] == "object_missing"
        assert chunk.key in missing.json()["error"]["message"]
        _nothing_left(cluster, cid, before)
        with _gw(cluster, 0) as gw:
            assert gw.delete(f"/v1/checkpoints/{cid}").status_code == 204
    finally:
        with contextlib.suppress(Exception):
            Sandbox.connect(sb.id, url=cluster.gateways[0].url, api_key=cluster.key).kill()


def _nothing_left(c: Cluster, cid: str, placed_before: set[str]) -> None:
    """No placement, no sandbox, no checkpoint and no partial download on any node."""
    assert _placements(c) == placed_before
    for name, agent in c.agents.items():
        assert not _local(c, name, cid)
        incoming = agent.state / "incoming"
        assert not incoming.exists() or not list(incoming.iterdir()), list(incoming.iterdir())


def _store(c: Cluster, s3: S3Config) -> ObjectStore:
    return ObjectStore(S3Config(s3.endpoint, c.s3["TARTARUS_S3_BUCKET"], s3.access_key, s3.secret_key))


def test_a_node_without_the_template_snapshot_fetches_it_from_the_store(
    cluster: Cluster,  # noqa: F811
    s3_config: S3Config,
    tmp_path: Path,
) -> None:
    template = get_template("python-ds")
    key = snapshot_key(template)
    original = find_snapshot(template)
    assert original is not None
    # The nodes of the fixture hold it (the suite's cache) and uploaded it once they joined.
    objects = _store(cluster, s3_config)
    assert wait_until(lambda: objects.exists(manifest_key(capture_of(key))), timeout=300)

    # A third node whose cache has everything but snapshots (kernel, agent, template images: linked).
    cache = tmp_path / "cache"
    cache.mkdir()
    for entry in cache_dir().iterdir():
        if entry.name != "snapshots":
            (cache / entry.name).symlink_to(entry)
    (cache / "snapshots").mkdir()
    node_c = Role(
        cluster.root,
        "agent",
        "node-c",
        cluster.url,
        cluster.token,
        *("--lease", str(LEASE_S), "--slots", "4"),
        env={**cluster.s3, "TARTARUS_CACHE_DIR": str(cache)},
    )
    cluster.agents["node-c"] = node_c
    others = [n for n in cluster.agents if n != "node-c"]
    sb = Sandbox.create("python-ds", url=cluster.gateways[0].url, api_key=cluster.key)
    made: list[str] = []
    try:
        fetched = cache / "snapshots" / key
        assert (fetched / "snapshot.json").exists()
        # The very build the others hold (a build of its own would have other memory), as a file of its own.
        assert fingerprint(fetched / "memory") == fingerprint(original.memory)
        assert (fetched / "memory").stat().st_ino != original.memory.stat().st_ino
        assert f"fetched snapshot {key} of template python-ds" in node_c.log_path.read_text()
        with connect(cluster.url) as conn:
            assert "python-ds" in Membership(conn).node("node-c").templates
        assert _fetched_bytes(node_c, cluster, "snapshot") > 0

        # A checkpoint taken on another node restores on node-c: only over the same snapshot build.
        _prepare(sb)
        with _gw(cluster, 0) as gw:
            taken = gw.post(f"/v1/sandboxes/{sb.id}/checkpoints", json={})
        assert taken.status_code == 201, taken.text
        cid = taken.json()["id"]
        for name in others:
            assert cluster.nodes("cordon", name).returncode == 0
        with _gw(cluster, 1) as gw:
            started = gw.post(f"/v1/checkpoints/{cid}/sandboxes", json={})
            assert started.status_code == 201, started.text
            made.append(started.json()["id"])
            assert cluster.where(made[0]).node == "node-c"
            _intact(Sandbox.connect(made[0], url=cluster.gateways[1].url, api_key=cluster.key))
            assert gw.delete(f"/v1/checkpoints/{cid}").status_code == 204
        assert _fetched_bytes(node_c, cluster, "checkpoint") > 0
    finally:
        for name in others:
            cluster.nodes("uncordon", name)
        for sandbox_id in [*made, sb.id]:
            with contextlib.suppress(Exception):
                Sandbox.connect(sandbox_id, url=cluster.gateways[0].url, api_key=cluster.key).kill()
        cluster.agents.pop("node-c").stop()


def _fetched_bytes(agent: Role, c: Cluster, kind: str) -> float:
    """The agent's own count of bytes it fetched from the store, from its /metrics (admin key)."""
    text = httpx.get(f"{agent.url}/metrics", headers=_auth(c), timeout=30).text
    line = f'tartarus_node_store_fetched_bytes_total{{kind="{kind}"}} '
    found = [row for row in text.splitlines() if row.startswith(line)]
    return float(found[0][len(line) :]) if found else 0.0
