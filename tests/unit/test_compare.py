"""`bench compare` without running a benchmark: revisions, worktree cleanup, and the comparison document."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tartarus.bench.compare import MIN_SAMPLES_FOR_P99, compare, resolve, summarise, worktree
from tartarus.errors import InvalidArgument
from tartarus.paths import REPO_ROOT


def _worktrees() -> str:
    return subprocess.run(
        ["git", "-C", str(REPO_ROOT), "worktree", "list", "--porcelain"], capture_output=True, text=True
    ).stdout


def test_resolve_gives_a_commit_or_a_clear_error() -> None:
    head = resolve("HEAD")
    assert len(head) == 40 and all(c in "0123456789abcdef" for c in head)
    with pytest.raises(InvalidArgument, match="names no commit"):
        resolve("no-such-revision-xyz")
    with pytest.raises(InvalidArgument, match="not a git revision"):
        resolve("--output=/tmp/x")


def test_worktree_is_removed_when_the_run_fails(tmp_path: Path) -> None:
    commit = resolve("HEAD")
    with pytest.raises(RuntimeError), worktree(commit, tmp_path) as tree:
        assert (tree / "src" / "tartarus" / "cli" / "main.py").is_file()
        assert str(tree) in _worktrees()
        raise RuntimeError("benchmark failed")
    assert not tree.exists()
    assert str(tree) not in _worktrees()


def test_unsupported_benchmark_is_refused_before_any_worktree(tmp_path: Path) -> None:
    before = _worktrees()
    with pytest.raises(InvalidArgument, match="supports"):
        compare("HEAD", "HEAD", "image-convert", 2, 5, [], lambda _: None)
    assert _worktrees() == before


def _doc(values: list[float]) -> dict[str, Any]:
    return {"samples": len(values), "p50_ms": 0.0, "p99_ms": 0.0, "values_ms": values, "accel": "tcg"}


def test_summary_pools_rounds_and_gives_ratios() -> None:
    a = [_doc([100.0 + i for i in range(10)]) for _ in range(3)]
    b = [_doc([200.0 + 2 * i for i in range(10)]) for _ in range(3)]
    doc = summarise("main", "topic", ("a" * 40, "b" * 40), a, b)
    median = doc["ratio_b_over_a"]["median"]
    assert median["ratio"] == pytest.approx(2.0, rel=0.01)
    assert median["low"] > 1 and median["verdict"] == "B slower"
    assert (median["n_a"], median["runs_a"]) == (30, 3)
    assert doc["ratio_b_over_a"]["p99"] is None  # 30 samples a side: too few for a P99
    assert doc["a"]["pooled"]["samples"] == 30 and len(doc["b"]["values_ms"]) == 3
    assert doc["accel"] == "tcg"


def test_p99_ratio_once_there_are_enough_samples() -> None:
    n = MIN_SAMPLES_FOR_P99
    a, b = [_doc([float(i + 1) for i in range(n)])], [_doc([float(i + 1) for i in range(n)])]
    p99 = summarise("x", "y", ("a" * 40, "b" * 40), a, b)["ratio_b_over_a"]["p99"]
    assert p99["ratio"] == pytest.approx(1.0) and p99["low"] <= 1 <= p99["high"]
