"""Waking on another node, in `tartarus bench cluster --wakes N`: a sandbox owning 50 MiB hibernated on one
node and woken on the other through a gateway, split into fetch and restore.

Two `tartarus agent` processes with the benchmark's SeaweedFS as their object store and one `tartarus
gateway`, on loopback, with the benchmark's PostgreSQL. One sandbox fills `--wake-mib` MiB of its
interpreter's memory with random bytes (incompressible: the worst case for the store's zstd) and then
moves back and forth: each sample hibernates it through the gateway, waits until its placement says it
is in the object store, cordons the node it slept on (so the wake must go to the other), and times the
first call after (an exec of `true` through the gateway: placement of the wake, the agent's fetch and
restore, the confirm, the exec). The waking agent's own split comes from its audit event (`placed`,
`fetch_ms` = download with every chunk verified and the capture made this node's, `restore_ms` = the
daemon's wake). Each sample also checks the sandbox's memory is intact.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tartarus.bench.gateway import _role
from tartarus.bench.services import s3_server
from tartarus.bench.stats import summary_ms
from tartarus.cluster import events
from tartarus.cluster.db import connect
from tartarus.cluster.membership import Membership
from tartarus.cluster.model import Admin
from tartarus.cluster.placement import Placer
from tartarus.errors import TartarusError

Progress = Callable[[int], None]
_COST = re.compile(r"fetch_ms=([0-9.]+) restore_ms=([0-9.]+) raw_bytes=([0-9]+) fetched_bytes=([0-9]+)")
STORED_TIMEOUT_S = 300


def bench_wake_elsewhere(
    database_url: str, template: str, samples: int, mib: int, progress: Progress
) -> dict[str, Any]:
    token = secrets.token_hex(32)
    with (
        s3_server(bucket="tartarus-bench-wake") as s3,
        tempfile.TemporaryDirectory(prefix="tartarus-bench-wake-") as tmp,
    ):
        root = Path(tmp)
        env = {
            **os.environ,
            "TARTARUS_DATABASE_URL": database_url,
            "TARTARUS_AGENT_TOKEN": token,
            "TARTARUS_POOL_SIZE": "0",
            "TARTARUS_S3_ENDPOINT": s3.endpoint,
            "TARTARUS_S3_BUCKET": s3.bucket,
            "TARTARUS_S3_ACCESS_KEY": s3.access_key,
            "TARTARUS_S3_SECRET_KEY": s3.secret_key,
        }
        for name in ("node-a", "node-b", "gateway"):
            (root / name).mkdir()
        with (
            _role("agent", root / "node-a", env, "--name", "node-a", "--slots", "4"),
            _role("agent", root / "node-b", env, "--name", "node-b", "--slots", "4"),
            _role("gateway", root / "gateway", env) as gateway,
        ):
            key = (root / "node-a" / "admin.key").read_text().strip()
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=gateway.url, headers=headers, timeout=600) as client:
                return _measure(client, database_url, template, samples, mib, progress)


def _measure(
    client: httpx.Client, url: str, template: str, samples: int, mib: int, progress: Progress
) -> dict[str, Any]:
    created = client.post("/v1/sandboxes", json={"template": template})
    if created.status_code != 201:
        raise TartarusError(f"create answered {created.status_code}: {created.text}")
    sid = created.json()["id"]
    total: list[float] = []
    fetch: list[float] = []
    restore: list[float] = []
    hibernate: list[float] = []
    sizes: list[tuple[int, int]] = []
    moves: list[str] = []
    try:
        code = f"import os, hashlib\nheld = os.urandom({mib} << 20)\nhashlib.sha256(held).hexdigest()"
        digest = _code(client, sid, code)
        with connect(url) as conn:
            placer, members = Placer(conn), Membership(conn)
            for _ in range(samples):
                home = placer.locate(sid).node
                t0 = time.perf_counter()
                client.post(f"/v1/sandboxes/{sid}/hibernate").raise_for_status()
                deadline = time.monotonic() + STORED_TIMEOUT_S
                while not placer.locate(sid).stored:
                    if time.monotonic() > deadline:
                        raise TartarusError(
                            f"sandbox {sid} was not in the object store after {STORED_TIMEOUT_S} s"
                        )
                    time.sleep(0.02)
                hibernate.append(time.perf_counter() - t0)
                members.set_admin(home, Admin.CORDONED)
                try:
                    t0 = time.perf_counter()
                    with client.stream(
                        "POST", f"/v1/sandboxes/{sid}/exec", json={"argv": ["true"]}
                    ) as stream:
                        if stream.status_code != 200:
                            raise TartarusError(f"exec answered {stream.status_code}: {stream.read()!r}")
                        for _ in stream.iter_bytes():
                            pass
                    total.append(time.perf_counter() - t0)
                finally:
                    members.set_admin(home, Admin.ACTIVE)
                where = placer.locate(sid).node
                if where == home:
                    raise TartarusError(f"sandbox {sid} woke on its own node {home}, not another")
                moves.append(f"{home}->{where}")
                cost = _cost(conn, sid, where)
                fetch.append(cost[0])
                restore.append(cost[1])
                sizes.append((cost[2], cost[3]))
                progress(1)
        if _code(client, sid, "hashlib.sha256(held).hexdigest()") != digest:
            raise TartarusError("the sandbox's memory changed across its moves")
    finally:
        with contextlib.suppress(httpx.HTTPError):
            client.delete(f"/v1/sandboxes/{sid}")
    raw = sorted(s[0] for s in sizes)[len(sizes) // 2] if sizes else 0
    fetched = sorted(s[1] for s in sizes)[len(sizes) // 2] if sizes else 0
    return {
        "template": template,
        "owned_mib": mib,
        "capture_apparent_mib_p50": round(raw / 2**20, 1),
        "fetched_mib_p50": round(fetched / 2**20, 1),
        "moves": sorted(set(moves)),
        "first_call_after_hibernation": summary_ms(total),
        "fetch": summary_ms(fetch),
        "restore": summary_ms(restore),
        "hibernate_and_upload": summary_ms(hibernate),
    }


def _code(client: httpx.Client, sid: str, code: str) -> str:
    answer = client.post(f"/v1/sandboxes/{sid}/code", json={"code": code})
    answer.raise_for_status()
    doc = answer.json()
    if doc.get("error"):
        raise TartarusError(f"code failed in the sandbox: {doc['error']}")
    return str(doc.get("result"))


def _cost(conn: Any, sid: str, node: str) -> tuple[float, float, int, int]:
    """The waking agent's own split, from its `placed` audit event."""
    for event in events.recent(conn, node=node, limit=50):
        if event.sandbox_id == sid and event.kind == "placed":
            found = _COST.search(event.detail)
            if found is None:
                break
            return float(found[1]) / 1000, float(found[2]) / 1000, int(found[3]), int(found[4])
    raise TartarusError(f"no wake of {sid} recorded on {node}")
