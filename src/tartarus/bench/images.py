"""`image-convert`: the python:3.11-slim equivalent from a local registry to a bootable filesystem.

Three measurements in one run, against one local `docker-registry` this benchmark starts on 127.0.0.1
and pushes the test image to:

- cold: `tartarus.images.pull` in a fresh process with an empty cache (a new store each time), timed
  from process start to exit, so interpreter start-up and imports count as they would for
  `tartarus image pull`. Its peak memory is measured too: the converting process's own peak RSS plus the
  largest of its children's (the layer worker, mkfs) — an upper bound of what ran at once.
- baseline: what a user would otherwise script — `skopeo copy docker://… oci:DIR`, `umoci unpack`,
  sizing with `du`/`find`, `mkfs.ext4 -d` (no journal) — on the same filesystem. Cold and baseline runs
  alternate, so both see the same machine load.
- warm: `pull` again, in-process, with the image converted: one manifest request and a file read.

ratio = median cold / median baseline.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tartarus.bench.stats import summary_ms

_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from pathlib import Path
from tartarus.images.api import pull
from tartarus.images.cache import ImageCache
t1 = time.perf_counter()
build = pull(sys.argv[1], store=ImageCache(Path(sys.argv[2])), fstype=sys.argv[3])
t2 = time.perf_counter()
print(json.dumps({
    "import_s": t1 - t0,
    "pull_s": t2 - t1,
    "self_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "children_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    "entries": build.entries,
    "size": build.size,
}))
"""

Progress = Callable[[str], None]


def _cold(ref: str, store: Path, fstype: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, ref, str(store), fstype], capture_output=True, text=True, timeout=600
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"conversion failed: {proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    result["peak_rss_mb"] = (result["self_rss_kb"] + result["children_rss_kb"]) / 1024
    return result


def _timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout


def _baseline(ref: str, work: Path) -> dict[str, float]:
    """The pipeline a user would script, phase by phase."""
    layout, bundle, image = work / "layout", work / "bundle", work / "rootfs.ext4"
    work.mkdir(parents=True)
    skopeo, _ = _timed(
        ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:image"]
    )
    umoci, _ = _timed(["umoci", "unpack", "--image", f"{layout}:image", str(bundle)])
    rootfs = bundle / "rootfs"
    size_s, used = _timed(["du", "-sb", str(rootfs)])
    count_s, found = _timed(["find", str(rootfs), "-xdev"])
    size_mib = int(int(used.split()[0]) * 1.25 / 2**20) + 64
    inodes = len(found.splitlines()) + 4096
    mkfs, _ = _timed(
        [
            "mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-b", "4096", "-N", str(inodes),
            "-d", str(rootfs), str(image), f"{size_mib}M",
        ]
    )  # fmt: skip
    return {
        "skopeo_s": skopeo,
        "umoci_s": umoci,
        "size_s": size_s + count_s,
        "mkfs_s": mkfs,
        "total_s": skopeo + umoci + size_s + count_s + mkfs,
    }


def bench_image_convert(cold_runs: int, warm_runs: int, fstype: str, say: Progress) -> dict[str, Any]:
    from tartarus.images.api import pull
    from tartarus.images.cache import ImageCache
    from tartarus.images.testing import python_registry, python_slim_layout

    if os.geteuid() != 0:
        raise RuntimeError("the image-convert benchmark needs root (loop mounts, umoci unpack as root)")
    say("preparing the python:3.11-slim equivalent (cached after the first run)")
    layout = python_slim_layout()
    layers = json.loads(
        (
            layout
            / "blobs/sha256"
            / json.loads((layout / "index.json").read_text())["manifests"][0]["digest"][7:]
        ).read_bytes()
    )["layers"]
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-images-") as tmp:
        root = Path(tmp)
        with python_registry(root / "registry") as (_, ref):
            colds: list[dict[str, Any]] = []
            baselines: list[dict[str, float]] = []
            for i in range(cold_runs):
                say(f"cold conversion {i + 1}/{cold_runs}")
                colds.append(_cold(ref, root / f"cold-{i}", fstype))
                shutil.rmtree(root / f"cold-{i}")  # deleted before writeback: later runs are not slowed
                say(f"baseline pipeline {i + 1}/{cold_runs}")
                baselines.append(_baseline(ref, root / f"baseline-{i}"))
                shutil.rmtree(root / f"baseline-{i}")
            say(f"warm pulls x{warm_runs}")
            store = ImageCache(root / "warm")
            build = pull(ref, store=store, fstype=fstype)
            warm: list[float] = []
            for _ in range(warm_runs):
                t0 = time.perf_counter()
                again = pull(ref, store=store, fstype=fstype)
                warm.append(time.perf_counter() - t0)
                assert again.rootfs == build.rootfs
    cold_s = statistics.median(c["wall_s"] for c in colds)
    baseline_s = statistics.median(b["total_s"] for b in baselines)
    warm_summary = summary_ms(warm)
    return {
        "cold_s": round(cold_s, 3),
        "warm_ms": warm_summary["p50_ms"],
        "baseline_s": round(baseline_s, 3),
        "ratio": round(cold_s / baseline_s, 3),
        "peak_rss_mb": round(max(c["peak_rss_mb"] for c in colds), 1),
        "samples": {"cold": len(colds), "baseline": len(baselines), "warm": len(warm)},
        "cold_runs": [{k: round(v, 3) if isinstance(v, float) else v for k, v in c.items()} for c in colds],
        "baseline_runs": [{k: round(v, 3) for k, v in b.items()} for b in baselines],
        "warm": warm_summary,
        "image": {
            "ref": "python:3.11-slim equivalent (debootstrap bookworm minbase + python3, 4 layers)",
            "layers": len(layers),
            "compressed_mb": round(sum(layer["size"] for layer in layers) / 2**20, 1),
            "entries": build.entries,
            "fs_on_disk_mb": round(build.size / 2**20, 1),
        },
        "fstype": fstype,
        "targets": {"cold_s": 5.0, "ratio": 0.5, "warm_ms": 50.0, "peak_rss_mb": 300.0},
        "what": "cold: fresh process + empty cache → bootable fs; baseline: skopeo copy + umoci unpack + "
        "du/find sizing + mkfs.ext4 -d; warm: in-process pull of a converted image (one manifest GET)",
    }
