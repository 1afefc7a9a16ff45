"""Benchmark results read back from their JSON: the summaries, phases and figures inside each document.

Documents differ in shape (cold-start nests `concurrent` and `api`, wake/hibernate nest `sequential`,
`concurrent` and a baseline, image-convert keeps lists of runs), so summaries are found by what they are
— an object with an integer `samples` and a `p50_ms` — wherever they sit. Files that are absent are
skipped; a summary without `values_ms` (older results) is kept, it just has no samples to plot.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tartarus.errors import InvalidArgument

# The files `bench all` writes, in the order a report presents them; other *.json files follow.
KNOWN = (
    "cold-start",
    "wake",
    "hibernate",
    "image-convert",
    "quarantine",
    "boot",
    "exec",
    "density",
    "throughput",
)
SUMMARY_KEYS = ("samples", "p50_ms", "p90_ms", "p99_ms", "min_ms", "max_ms", "mean_ms", "values_ms")
# Wake and hibernate share one run: each file holds both, and shows only its own.
SHARED_RUN = ("wake", "hibernate")
NOT_FIGURES = {"benchmark", "started_at", "accel", "machine", "phases", "phases_cumulative", "smoke"}
FRIENDLY = {
    "api": "through the REST API",
    "baseline_full_stream": "baseline: full QEMU stream",
    "warm": "warm cache",
    "ping": "agent ping",
    "by_concurrency": "concurrency",
    "create_to_answer": "create → answer",
}

# Labels one benchmark gives its own parts (cold-start's ready-pool loads: `bench.warmstart`).
FRIENDLY_IN = {
    "cold-start": {
        "cold": "cold (restore)",
        "warm": "warm (ready pool)",
        "steady": "ready pool, steady arrivals",
        "burst": "ready pool, bursts",
        "api_warm": "warm through the REST API",
    }
}

Doc = dict[str, Any]


@dataclass(frozen=True)
class Summary:
    """One latency distribution of one benchmark: `mode` says which (empty for the headline)."""

    benchmark: str
    mode: str
    samples: int
    p50_ms: float
    p90_ms: float | None
    p99_ms: float | None
    values_ms: tuple[float, ...] | None
    phases: dict[str, Doc]


def load_results(json_dir: Path) -> dict[str, Doc]:
    """Every result document in `json_dir`, by benchmark name (the file's stem)."""
    if not json_dir.is_dir():
        raise InvalidArgument(f"{json_dir} is not a directory")
    known = [json_dir / f"{name}.json" for name in KNOWN]
    others = sorted(p for p in json_dir.glob("*.json") if p.stem not in KNOWN)
    results: dict[str, Doc] = {}
    for path in known + others:
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InvalidArgument(f"{path}: not a readable JSON document ({e})") from e
        if not isinstance(doc, dict):
            raise InvalidArgument(f"{path}: expected a JSON object, found {type(doc).__name__}")
        if path.stem in KNOWN or "benchmark" in doc:
            results[path.stem] = doc
    if not results:
        raise InvalidArgument(f"no benchmark results in {json_dir} (expected e.g. cold-start.json)")
    return results


def is_summary(node: object) -> bool:
    return (
        isinstance(node, dict)
        and isinstance(node.get("samples"), int)
        and isinstance(node.get("p50_ms"), int | float)
    )


def _walk(node: Doc, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Doc, Doc | None]]:
    """(path, summary, parent) for every summary under `node`, phases excluded."""
    for key, value in node.items():
        if key in NOT_FIGURES or not isinstance(value, dict):
            continue
        if is_summary(value):
            yield (*path, key), value, node
        yield from _walk(value, (*path, key))


def _mode(benchmark: str, path: tuple[str, ...], node: Doc, parent: Doc | None) -> str:
    parts = list(path[:-1] if benchmark in SHARED_RUN and path else path)
    friendly = {**FRIENDLY, **FRIENDLY_IN.get(benchmark, {})}
    label = " ".join(friendly.get(p, p) for p in parts)
    concurrency = node.get("concurrency", (parent or {}).get("concurrency"))
    if not label and concurrency == 1:
        label = "sequential"
    if isinstance(concurrency, int) and concurrency > 1 and "concurrency" not in label:
        at_once = f"{concurrency} at a time"
        label = at_once if label in ("", "concurrent") else f"{label}, {at_once}"
    return label


def number_or_none(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _summary(benchmark: str, mode: str, node: Doc) -> Summary:
    values = node.get("values_ms")
    phases = node.get("phases_cumulative")
    return Summary(
        benchmark=benchmark,
        mode=mode,
        samples=int(node["samples"]),
        p50_ms=float(node["p50_ms"]),
        p90_ms=number_or_none(node.get("p90_ms")),
        p99_ms=number_or_none(node.get("p99_ms")),
        values_ms=tuple(float(v) for v in values) if isinstance(values, list) else None,
        phases={k: v for k, v in phases.items() if is_summary(v)} if isinstance(phases, dict) else {},
    )


def summaries(benchmark: str, doc: Doc) -> list[Summary]:
    """The latency summaries of one document: its headline first, then nested ones in file order."""
    found: list[Summary] = []
    shared = benchmark in SHARED_RUN
    if is_summary(doc) and not (shared and "sequential" in doc):  # there it only repeats sequential
        found.append(_summary(benchmark, _mode(benchmark, (), doc, None), doc))
    for path, node, parent in _walk(doc, ()):
        if shared and path[-1] != benchmark:
            continue
        found.append(_summary(benchmark, _mode(benchmark, path, node, parent), node))
    return found


def figures(
    doc: Doc, exclude: tuple[str, ...] = (), prefix: str = "", depth: int = 3
) -> list[tuple[str, float]]:
    """Numbers that are not latency percentiles (sizes, rates, ratios), by dotted name, in file order."""
    found: list[tuple[str, float]] = []
    skip = {*NOT_FIGURES, *exclude, *(SUMMARY_KEYS if is_summary(doc) else ())}
    for key, value in doc.items():
        if key in skip:
            continue
        name = f"{prefix}{key}"
        number = number_or_none(value)
        if number is not None:
            found.append((name, number))
        elif isinstance(value, dict) and depth > 1:
            found += figures(value, exclude, f"{name}.", depth - 1)
    return found


def value_at(results: dict[str, Doc], benchmark: str, path: tuple[str, ...], key: str) -> float | None:
    """A number inside one result, or None when that result or field is absent."""
    node: object = results.get(benchmark)
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return number_or_none(node.get(key)) if isinstance(node, dict) else None


def series(doc: Doc) -> list[Doc]:
    """A benchmark's curve (e.g. density: one point per number of sandboxes), if it has one."""
    for key in ("curve", "series"):
        points = doc.get(key)
        if isinstance(points, list) and points and all(isinstance(p, dict) for p in points):
            return points
    return []
