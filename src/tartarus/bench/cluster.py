"""`tartarus bench cluster`: the coordination core's own costs, on services this benchmark starts.

Placement decision latency is `Placer.reserve` (the candidate query, ranking, and the locked reservation
transaction) timed per call at 3 and 64 simulated nodes: rows registered as agents would register, with
no agent behind them, since the decision is database work. Sandboxes placed stay placed, so later samples
rank nodes that carry load. The concurrent run places from several connections at once (as several
gateways would) into nodes with less room than demanded and checks that no node ends over capacity.

The state store figures time a capture of one incompressible file (worst case for zstd, so throughput is
the transfer's, not the compressor's shortcut) up to SeaweedFS on loopback and back, verified, plus the
re-upload of an unchanged capture (every chunk deduplicated).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tartarus.bench.gateway import bench_gateway
from tartarus.bench.services import postgres_server, s3_server
from tartarus.bench.stats import percentile, summary_ms
from tartarus.bench.wake_elsewhere import bench_wake_elsewhere
from tartarus.cluster.db import Connection, connect
from tartarus.cluster.errors import NoCapacity
from tartarus.cluster.membership import Membership
from tartarus.cluster.model import Demand, NodeSpec, Resources
from tartarus.cluster.objects import ObjectStore
from tartarus.cluster.placement import Placer
from tartarus.cluster.schema import migrate
from tartarus.cluster.statestore import StateStore

Progress = Callable[[int], None]
NODE_SIZES = (3, 64)
BIG = Resources(vcpus=10_000, memory_mib=10**8, disk_mib=10**8, slots=100_000)


def _demand(sandbox_id: str) -> Demand:
    return Demand(sandbox_id=sandbox_id, vcpus=1, memory_mib=512, disk_mib=0, template="python-ds")


def _reset(conn: Connection, nodes: int, capacity: Resources) -> None:
    conn.execute("TRUNCATE cluster.placements, cluster.events, cluster.nodes")
    members = Membership(conn, lease_s=3600)
    for i in range(nodes):
        templates = frozenset({"python-ds"}) if i % 2 == 0 else frozenset()
        members.register(
            NodeSpec(f"node-{i:03d}", f"10.0.{i // 250}.{i % 250 + 1}:7000", capacity, templates=templates)
        )


def _sequential(conn: Connection, nodes: int, samples: int, progress: Progress) -> dict[str, Any]:
    _reset(conn, nodes, BIG)
    placer = Placer(conn)
    decide, confirm = [], []
    for i in range(samples):
        t0 = time.perf_counter()
        r = placer.reserve(_demand(f"seq-{nodes}-{i}"))
        t1 = time.perf_counter()
        placer.confirm(r)
        confirm.append(time.perf_counter() - t1)
        decide.append(t1 - t0)
        progress(1)
    return {"nodes": nodes, **summary_ms(decide), "confirm": summary_ms(confirm)}


def _concurrent(
    url: str, conn: Connection, gateways: int, demands: int, progress: Progress
) -> dict[str, Any]:
    """`demands` placements from `gateways` connections into 3 nodes with room for 3/4 of them."""
    per_node = demands * 3 // 4 // 3
    _reset(conn, 3, Resources(vcpus=10_000, memory_mib=10**8, disk_mib=10**8, slots=per_node))
    latencies: list[float] = []
    placed = refused = errors = 0
    lock = threading.Lock()
    barrier = threading.Barrier(gateways)

    def gateway(k: int) -> None:
        nonlocal placed, refused, errors
        with connect(url) as c:
            placer = Placer(c)
            barrier.wait()
            for i in range(k, demands, gateways):
                t0 = time.perf_counter()
                try:
                    placer.confirm(placer.reserve(_demand(f"con-{i}")))
                    outcome = "placed"
                except NoCapacity:
                    outcome = "refused"
                except Exception:
                    outcome = "error"
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    placed += outcome == "placed"
                    refused += outcome == "refused"
                    errors += outcome == "error"
                progress(1)

    threads = [threading.Thread(target=gateway, args=(k,)) for k in range(gateways)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    over = [v.name for v in Membership(conn).nodes() if not v.capacity.covers(v.used)]
    return {
        "gateways": gateways,
        "demands": demands,
        "capacity": per_node * 3,
        "placed": placed,
        "no_capacity": refused,
        "errors": errors,
        "nodes_over_capacity": over,
        "reserve_and_confirm": summary_ms(latencies),
    }


def _state_store(file_mib: int, samples: int, progress: Progress) -> dict[str, Any]:
    up, down, again = [], [], []
    with s3_server() as config, tempfile.TemporaryDirectory(prefix="tartarus-bench-") as tmp:
        objects = ObjectStore(config)
        objects.ensure_bucket()
        store = StateStore(objects)
        for i in range(samples):
            src = Path(tmp) / f"memory-{i}.state"
            with open(src, "wb") as f:
                for _ in range(file_mib):
                    f.write(os.urandom(1 << 20))
            t0 = time.perf_counter()
            store.upload(f"cap-{i}", [("memory.state", src)])
            t1 = time.perf_counter()
            store.download(f"cap-{i}", Path(tmp) / f"out-{i}")
            t2 = time.perf_counter()
            store.upload(f"cap-{i}-again", [("memory.state", src)])
            t3 = time.perf_counter()
            if (Path(tmp) / f"out-{i}" / "memory.state").read_bytes() != src.read_bytes():
                raise AssertionError("the downloaded capture differs from the uploaded one")
            up.append(t1 - t0)
            down.append(t2 - t1)
            again.append(t3 - t2)
            src.unlink()
            (Path(tmp) / f"out-{i}" / "memory.state").unlink()
            progress(1)
    return {
        "file_mib": file_mib,
        "chunk_mib": store.chunk_size >> 20,
        "workers": store.workers,
        "upload": {**summary_ms(up), "mib_per_s_p50": round(file_mib / percentile(up, 50), 1)},
        "download": {**summary_ms(down), "mib_per_s_p50": round(file_mib / percentile(down, 50), 1)},
        "reupload_deduplicated": summary_ms(again),
    }


def bench_cluster(
    samples: int,
    concurrency: int,
    file_mib: int,
    state_samples: int,
    progress: Progress,
    *,
    creates: int = 0,
    calls: int = 0,
    template: str = "python-ds",
    wakes: int = 0,
    wake_mib: int = 50,
) -> dict[str, Any]:
    """`creates` > 0 also runs a real agent and gateway (bench/gateway.py): the gateway's overhead;
    `wakes` > 0 two agents with an object store (bench/wake_elsewhere.py): waking on another node."""
    with postgres_server() as url, connect(url) as conn:
        migrate(conn)
        by_nodes = {f"nodes_{n}": _sequential(conn, n, samples, progress) for n in NODE_SIZES}
        concurrent = _concurrent(url, conn, concurrency, samples, progress)
        conn.execute("TRUNCATE cluster.placements, cluster.events, cluster.nodes")  # no simulated nodes
        roles = bench_gateway(url, template, creates, calls, progress) if creates else None
        conn.execute("TRUNCATE cluster.placements, cluster.events, cluster.nodes")
        moved = bench_wake_elsewhere(url, template, wakes, wake_mib, progress) if wakes else None
    state = _state_store(file_mib, state_samples, progress)
    headline = by_nodes[f"nodes_{NODE_SIZES[-1]}"]
    return {
        **{k: v for k, v in headline.items() if k != "confirm"},
        "placement": by_nodes,
        "concurrent": concurrent,
        "state_store": state,
        **({"gateway": roles} if roles else {}),
        **({"wake_on_another_node": moved} if moved else {}),
    }
