"""Checkpoints in the object store, with real parts: the suite's PostgreSQL, SeaweedFS on loopback, two
`tartarus agent` processes with the store and two gateways (the `cluster` fixture of test_stored); real VMs.

A checkpoint taken through one gateway is a row of the cluster and a capture in the bucket: sandboxes start
from it on a node that never had it (its node killed), with its Python variables and files; a fork is
placed; a capture with a corrupt or missing chunk is a clear error and leaves nothing on any node.
"""

from __future__ import annotations

import contextlib
import signal

import httpx
import pytest

from tartarus.cluster import checkpoints
from tartarus.cluster.db import connect
from tartarus.cluster.membership import Membership
from tartarus.cluster.objects import ObjectStore, S3Config
from tartarus.cluster.statestore import StateStore
from tartarus.sdk import Sandbox
from tests.cluster.test_stored import Cluster, _auth, cluster  # noqa: F401  (the module's fixture)
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
        objects = ObjectStore(
            S3Config(
                s3_config.endpoint,
                cluster.s3["TARTARUS_S3_BUCKET"],
                s3_config.access_key,
                s3_config.secret_key,
            )
        )
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
