"""Every benchmark runs and writes a well-formed result (`tartarus bench all --smoke`): none may rot.
This checks shapes, never timings: a few samples on a shared CI machine measure nothing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.vm.test_cli import TARTARUS

LATENCY = ["cold-start", "wake", "hibernate", "boot", "exec"]


def _latency_ok(doc: dict[str, object]) -> None:
    samples, p50, p99, top = doc["samples"], doc["p50_ms"], doc["p99_ms"], doc["max_ms"]
    assert isinstance(samples, int) and samples > 0
    assert isinstance(p50, float | int) and isinstance(p99, float | int) and isinstance(top, float | int)
    assert 0 < p50 <= p99 <= top
    values = doc["values_ms"]
    assert isinstance(values, list) and len(values) == samples


@pytest.mark.timeout(900)  # eight benchmarks, each booting or restoring VMs
def test_bench_all_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "TARTARUS_STATE_DIR": str(tmp_path / "state")}
    out = tmp_path / "results"
    proc = subprocess.run(
        [str(TARTARUS), "bench", "all", "--smoke", "--json-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(docs) == {*LATENCY, "density", "throughput", "image-convert", "quarantine"}
    for name, doc in docs.items():
        assert doc["benchmark"] == name and doc["smoke"] is True
        assert doc["machine"]["git_rev"] and doc["machine"]["cores"] > 0
    for name in LATENCY:
        _latency_ok(docs[name])
    for mode in ("sequential", "concurrent", "baseline_full_stream"):
        _latency_ok(docs["wake"][mode]["wake"])
        assert docs["wake"][mode]["hibernate"]["state_bytes_mean"] > 0
    assert docs["cold-start"]["accel"] in ("tcg", "kvm")
    for part in ("cold", "warm", "steady", "burst"):  # cold: restores; the rest: the ready pool
        _latency_ok(docs["cold-start"][part])
    assert docs["cold-start"]["warm"]["hit_rate"] == 1.0  # the pool is full before each create
    assert 0 < docs["cold-start"]["burst"]["hit_rate"] < 1  # a burst outruns a pool of 2
    density = docs["density"]
    assert len(density["curve"]) == density["sandboxes"] == 2 and density["pss_mib_per_sandbox"] > 0
    assert density["create_run_code_loaded"]["samples"] == density["create_run_code_empty"]["samples"] == 2
    assert density["breakdown_mib_per_sandbox"]["guest_ram"]["pss"] > 0
    rates = docs["throughput"]["by_concurrency"]
    assert set(rates) == {"1", "2", "4"} and all(r["sandboxes_per_s"] > 0 for r in rates.values())
    quarantine = docs["quarantine"]
    assert quarantine["admission"]["samples"] == 1000 and quarantine["overhead_p99_ms"] > 0
    convert = docs["image-convert"]
    assert convert["cold_s"] > 0 and convert["baseline_s"] > 0 and convert["warm_ms"] > 0
    # The report must keep up with the results' shapes.
    report = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [str(TARTARUS), "bench", "report", "--json-dir", str(out), "--output", str(report)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = report.read_text()
    assert all(f"`{name}`" in text or name in text for name in docs)
    # Every one of the original design's four claims finds its measured figure in a full set of results.
    claims = text.split("| original design claimed |", 1)[1].split("\n\n", 1)[0]
    assert claims.count("\n|") == 5 and "not in these results" not in claims, claims
    assert list((tmp_path / "BENCHMARKS-plots").glob("*.svg"))
