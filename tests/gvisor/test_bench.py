"""The gVisor benchmarks run end to end (few samples: proves they work, measures nothing)."""

from __future__ import annotations

import asyncio

import pytest

from tartarus.bench.coldstart import GVISOR_PHASES, WarmLoads, bench_cold_start
from tartarus.bench.compute import WORKLOADS, bench_compute
from tartarus.bench.gvisor_start import PHASES, bench_gvisor_start
from tests.gvisor.helpers import require_gvisor


@pytest.fixture(scope="module", autouse=True)
def gvisor_works() -> None:
    require_gvisor()


def test_compute_runs_every_workload_on_the_host_and_in_gvisor() -> None:
    steps: list[int] = []
    doc = bench_compute("python-ds", 1, steps.append, vm=False)
    assert set(doc["backends"]) == {"host", "gvisor"} and sum(steps) == 2
    for result in doc["backends"].values():
        assert set(result["p50_ms"]) == set(WORKLOADS)
        assert all(v > 0 for v in result["p50_ms"].values())
        assert result["blas_core"] != "?"  # OpenBLAS said which kernel it runs
    assert doc["backends"]["host"]["ratio_to_host"] == dict.fromkeys(WORKLOADS, 1.0)
    # Native compute is the point of the backend: far from TCG's ~8x even on a noisy shared machine.
    assert doc["backends"]["gvisor"]["ratio_to_host"]["python_loop"] < 3


def test_gvisor_start_times_each_phase_in_order_fresh_and_restored() -> None:
    steps: list[int] = []
    doc = asyncio.run(bench_gvisor_start("python-ds", 2, steps.append))
    assert sum(steps) == 4 and doc["samples"] == 2 and doc["fresh"]["samples"] == 2
    assert doc["created_ahead"]["samples"] == 2
    assert doc["image_bytes"] > 1_000_000  # numpy's Python is in it
    for result in (doc, doc["created_ahead"], doc["fresh"]):
        p50 = [result["phases_cumulative"][p]["p50_ms"] for p in PHASES]
        assert p50 == sorted(p50) and p50[0] > 0


def test_cold_start_per_backend_reports_gvisor_cold_and_warm_apart() -> None:
    steps: list[int] = []
    warm = WarmLoads(samples=2, ready=1, rate=4.0, steady_samples=2, burst=2, bursts=1)
    doc = asyncio.run(bench_cold_start("python-ds", 2, 1, 0, steps.append, warm, ("gvisor",)))
    gvisor = doc["backends"]["gvisor"]
    assert set(doc["backends"]) == {"gvisor"} and gvisor["backend"] == "gvisor"
    assert gvisor["samples"] == gvisor["cold_unpooled"]["samples"] == 2 and gvisor["pooled_fraction"] == 1
    assert gvisor["cold_unpooled"]["pooled_fraction"] == 0
    p50 = [gvisor["phases_cumulative"][p]["p50_ms"] for p in (*GVISOR_PHASES, "run_code")]
    assert p50[1:] == sorted(p50[1:]) and p50[-1] > 0  # a pooled create's spans grow from runsc create on
    assert gvisor["warm"]["samples"] == 2 and gvisor["warm"]["hit_rate"] == 1.0
    assert sum(steps) == 2 * 2 + warm.steps
