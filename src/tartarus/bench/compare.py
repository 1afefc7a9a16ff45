"""`bench compare REV_A REV_B`: one benchmark on two git revisions, alternately, on the same machine.

Absolute figures on a shared, noisy machine drift by tens of percent between runs; what a regression
check needs is B relative to A measured under the same conditions. So each revision gets its own
temporary `git worktree`, the benchmark runs in rounds A, B, A, B, ... (drift hits both sides), every
sample is kept with its round, and the result is the ratio B/A of medians (and of P99 when there are
enough samples for one) with a two-level bootstrap confidence interval (rounds, then samples: one run's
samples share its conditions, so run-to-run noise must show in the interval). Each run uses this
environment's Python with the revision's own `src` first on PYTHONPATH; the git revision recorded in each
result proves which code ran. Worktrees are removed afterwards, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tartarus.bench.bootstrap import median, p99, ratio_ci
from tartarus.bench.machine import machine_info
from tartarus.bench.stats import summary_ms
from tartarus.errors import InvalidArgument, TartarusError
from tartarus.paths import REPO_ROOT

# Benchmarks whose sample count is `--samples`; their headline summary carries `values_ms`.
COMPARABLE = ("boot", "exec", "cold-start", "wake", "hibernate")
# Below this many samples per side a P99 is little more than the maximum: its ratio is not reported.
MIN_SAMPLES_FOR_P99 = 100
STOP_GRACE_S = 60.0

Log = Callable[[str], None]


class CompareFailed(TartarusError):
    code = "compare_failed"


def _git(*args: str, cwd: Path = REPO_ROOT) -> str:
    done = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise InvalidArgument(f"git {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


def resolve(rev: str) -> str:
    """The full commit id of `rev`, or a clear error if it names no commit."""
    if not rev or rev.startswith("-"):
        raise InvalidArgument(f"not a git revision: {rev!r}")
    try:
        return _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except InvalidArgument:
        raise InvalidArgument(f"{rev!r} names no commit in {REPO_ROOT}") from None


@contextlib.contextmanager
def worktree(commit: str, parent: Path) -> Iterator[Path]:
    """A detached worktree of `commit` under `parent`, removed (and pruned) however the block ends."""
    path = parent / commit[:12]
    _git("worktree", "add", "--detach", "--quiet", str(path), commit)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(path)])
        subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "prune"])


def _wait(proc: subprocess.Popen[bytes]) -> int:
    """Wait for a child; if we are interrupted, let it clean up its VMs (SIGTERM) before killing it."""
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def run_once(tree: Path, commit: str, benchmark: str, samples: int, extra: Sequence[str]) -> dict[str, Any]:
    """One run of `tartarus bench BENCHMARK` with the code of `tree`; its JSON result."""
    out = tree / f".compare-{benchmark}.json"
    out.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "tartarus.cli.main", "bench", benchmark, "--samples", str(samples)]
    argv += [*extra, "--json", str(out)]
    paths = [str(tree / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    rc = _wait(subprocess.Popen(argv, cwd=tree, env=env))
    if rc != 0 or not out.is_file():
        raise CompareFailed(f"bench {benchmark} at {commit[:12]} failed (exit status {rc})")
    doc: dict[str, Any] = json.loads(out.read_text())
    ran = str(doc.get("machine", {}).get("git_rev", "")).removesuffix("-dirty")
    if not ran or not commit.startswith(ran):
        raise CompareFailed(f"expected the code of {commit[:12]} to run, but the result says {ran or '?'}")
    if not isinstance(doc.get("values_ms"), list):
        raise CompareFailed(
            f"bench {benchmark} at {commit[:12]} does not record every sample (values_ms): "
            "that revision is too old to compare"
        )
    return doc


def _side(docs: list[dict[str, Any]]) -> dict[str, Any]:
    runs = [list(d["values_ms"]) for d in docs]
    pooled = summary_ms([v / 1000 for run in runs for v in run])
    return {
        "rounds": [{k: d[k] for k in ("samples", "p50_ms", "p99_ms")} for d in docs],
        "pooled": {k: v for k, v in pooled.items() if k != "values_ms"},
        "values_ms": runs,  # one list per round
    }


def summarise(
    rev_a: str,
    rev_b: str,
    commits: tuple[str, str],
    docs_a: list[dict[str, Any]],
    docs_b: list[dict[str, Any]],
) -> dict[str, Any]:
    """The comparison document: both sides pooled, and the ratios B/A with their intervals."""
    a, b = _side(docs_a), _side(docs_b)
    ratios: dict[str, Any] = {"median": ratio_ci(a["values_ms"], b["values_ms"], median).as_dict()}
    enough = min(a["pooled"]["samples"], b["pooled"]["samples"]) >= MIN_SAMPLES_FOR_P99
    ratios["p99"] = ratio_ci(a["values_ms"], b["values_ms"], p99).as_dict() if enough else None
    return {
        "a": {"rev": rev_a, "commit": commits[0], **a},
        "b": {"rev": rev_b, "commit": commits[1], **b},
        "ratio_b_over_a": ratios,
        "accel": docs_a[0].get("accel"),
        "what": docs_a[0].get("what"),
    }


def compare(
    rev_a: str,
    rev_b: str,
    benchmark: str,
    rounds: int,
    samples: int,
    extra: Sequence[str],
    log: Log,
) -> dict[str, Any]:
    """Run `benchmark` for `rounds` rounds of `samples` on each revision, alternately; the comparison."""
    if benchmark not in COMPARABLE:
        raise InvalidArgument(f"bench compare supports {', '.join(COMPARABLE)}, not {benchmark!r}")
    if rounds < 1 or samples < 1:
        raise InvalidArgument("rounds and samples must be at least 1")
    commits = resolve(rev_a), resolve(rev_b)
    started = time.time()
    docs: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
    with tempfile.TemporaryDirectory(prefix="tartarus-compare-") as tmp, contextlib.ExitStack() as stack:
        trees = [
            stack.enter_context(worktree(c, Path(tmp) / side)) for c, side in zip(commits, "ab", strict=True)
        ]
        for r in range(rounds):
            for side, (tree, commit) in enumerate(zip(trees, commits, strict=True)):
                log(f"round {r + 1}/{rounds}: {'AB'[side]} = {commit[:12]}")
                docs[side].append(run_once(tree, commit, benchmark, samples, extra))
    return {
        "benchmark": benchmark,
        "rounds": rounds,
        "samples_per_round": samples,
        "extra_args": list(extra),
        **summarise(rev_a, rev_b, commits, *docs),
        "machine": machine_info(docs[0][0].get("accel")),
        "started_at": started,
    }
