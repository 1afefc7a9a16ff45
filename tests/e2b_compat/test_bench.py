"""`tartarus bench e2b` runs both sides and writes a well-formed result (shapes, never timings: a few
samples on a shared CI machine measure nothing)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.vm.test_cli import TARTARUS

pytestmark = pytest.mark.vm


@pytest.mark.timeout(600)
def test_bench_e2b_measures_both_sdks_in_one_run(tmp_path: Path) -> None:
    out = tmp_path / "e2b.json"
    env = {**os.environ, "TARTARUS_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.run(
        [str(TARTARUS), "bench", "e2b", "-n", "2", "--rounds", "2", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "e2b"
    for workload in ("commands", "code"):
        part = doc[workload]
        assert part["errors"] == 0, part["error_samples"]
        for side in ("native", "e2b"):
            assert part[side]["samples"] == 2 and 0 < part[side]["p50_ms"] <= part[side]["p99_ms"]
        assert part["ratio_p50"] > 0 and part["ratio_p99"] > 0
