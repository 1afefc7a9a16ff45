"""SVG figures for the benchmark report: latency CDFs, per-phase bars, and curves such as density.

matplotlib with its object API (no pyplot global state) and the Agg/SVG backends only, so it runs on a
headless server. Output is reproducible: no timestamp in the file, fixed ids, text kept as text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter


def _style() -> AbstractContextManager[None]:
    """Fixed ids and text kept as text: the same data gives the same SVG."""
    return rc_context({"svg.hashsalt": "tartarus", "svg.fonttype": "none", "font.size": 9})


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _style():
        fig.savefig(path, format="svg", metadata={"Date": None}, bbox_inches="tight")
    return path


def cdf(curves: Mapping[str, Sequence[float]], title: str, path: Path) -> Path:
    """Empirical CDF of each labelled sample set (milliseconds), on a log x axis when they span >10x."""
    with _style():
        fig = Figure(figsize=(6.4, 3.6))
        ax = fig.add_subplot()
        lo, hi = float("inf"), 0.0
        for label, values in curves.items():
            ordered = sorted(values)
            n = len(ordered)
            ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=f"{label} (n={n})")
            lo, hi = min(lo, ordered[0]), max(hi, ordered[-1])
        if lo > 0 and hi / lo > 10:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        for q in (0.5, 0.99):
            ax.axhline(q, color="0.8", linewidth=0.6, zorder=0)
        ax.set(xlabel="latency (ms)", ylabel="fraction of samples ≤ x", ylim=(0, 1.02), title=title)
        ax.grid(True, which="major", axis="x", color="0.92")
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def phase_bars(bars: Mapping[str, Sequence[tuple[str, float]]], title: str, path: Path) -> Path:
    """One horizontal bar per label, split into phases; each pair is (phase, its duration in ms)."""
    with _style():
        fig = Figure(figsize=(6.4, 0.9 + 0.55 * len(bars)))
        ax = fig.add_subplot()
        labels = list(bars)
        phases = list(dict.fromkeys(p for segments in bars.values() for p, _ in segments))
        colors = {p: f"C{i}" for i, p in enumerate(phases)}
        for row, label in enumerate(labels):
            left = 0.0
            for phase, width in bars[label]:
                ax.barh(row, width, left=left, color=colors[phase], edgecolor="white", height=0.6)
                left += width
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set(xlabel="time from the call (ms, P50 of each cumulative phase)", title=title)
        handles = [ax.bar(0, 0, color=colors[p], label=p) for p in phases]
        ax.legend(
            handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=len(phases), fontsize=8
        )
    return _save(fig, path)


def curves(
    x: Sequence[float], ys: Mapping[str, Sequence[float]], xlabel: str, title: str, path: Path
) -> Path:
    """One small panel per measured quantity against a shared x (e.g. number of idle sandboxes)."""
    with _style():
        fig = Figure(figsize=(6.4, 1.9 * len(ys) + 0.4))
        axes = fig.subplots(len(ys), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (name, values) in zip(axes, ys.items(), strict=True):
            ax.plot(x, values, marker="o", markersize=3)
            ax.set_ylabel(name, fontsize=8)
            ax.grid(True, color="0.92")
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0].set_title(title)
        axes[-1].set_xlabel(xlabel)
    return _save(fig, path)
