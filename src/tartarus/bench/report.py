"""`bench report`: BENCHMARKS.md from the JSON results of `bench all`, with SVG plots beside it.

Every number in the report is read from the JSON files (or, for the claimed and published figures, from
`published.py`, each with its source); nothing measured is written here. Benchmarks whose file is absent
are left out, and summaries without `values_ms` get a table row but no CDF.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from pathlib import Path

from tartarus.bench import plots
from tartarus.bench.published import CLAIMS, PUBLISHED, Ours
from tartarus.bench.results import (
    SHARED_RUN,
    Doc,
    Summary,
    figures,
    load_results,
    number_or_none,
    series,
    summaries,
    value_at,
)

ACCEL = {
    "tcg": (
        "**TCG**, QEMU's software emulation: no hardware virtualisation, every guest instruction is "
        "translated by QEMU. Tartarus runs TCG only where a probe VM does not boot under KVM — `/dev/kvm` "
        "missing, or present but unusable for stock guest kernels (PVM nested virtualisation, where they "
        "hang). Whatever the guest executes (resuming, answering, running code) is several times slower "
        "than on a KVM host, so guest-bound figures here are pessimistic for production, which runs the "
        "same QEMU command line with `-accel kvm`."
    ),
    "kvm": "**KVM**: hardware virtualisation, as in production.",
}
PHASE_SOURCES = (("cold-start", "create"), ("wake", "wake"), ("hibernate", "hibernate"))


def ms(value: float | None) -> str:
    """A latency in milliseconds, to the precision the benchmarks record and no further noise."""
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def number(value: float, unit: str = "") -> str:
    text = f"{value:g}" if abs(value) < 1e6 else f"{value:.0f}"
    return f"{text} {unit}".strip() if unit not in ("", "/s") else f"{text}{unit}"


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _when(doc: Doc) -> str:
    started = doc.get("started_at")
    if not isinstance(started, int | float):
        return "?"
    return datetime.datetime.fromtimestamp(started, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def accelerators(results: dict[str, Doc]) -> list[str]:
    found = [doc.get("accel") or (doc.get("machine") or {}).get("accel") for doc in results.values()]
    return sorted({str(a) for a in found if a})


def machine_section(results: dict[str, Doc]) -> str:
    machines = [doc["machine"] for doc in results.values() if isinstance(doc.get("machine"), dict)]
    lines = ["## Machine and accelerator", ""]
    if machines:
        m = machines[0]
        lines.append(
            f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('memory_gib', '?')} GiB, "
            f"{m.get('os', '?')}, host kernel {m.get('host_kernel', '?')}, {m.get('qemu', '?')}."
        )
        fields = ("cpu", "cores", "memory_gib", "host_kernel", "qemu")
        if any(tuple(o.get(f) for f in fields) != tuple(m.get(f) for f in fields) for o in machines):
            lines.append("**The results come from different machines**: see each benchmark's run below.")
    accels = accelerators(results)
    lines.append("")
    if not accels:
        lines.append("The results do not record the accelerator.")
    for accel in accels:
        lines.append(f"Accelerator: {ACCEL.get(accel, f'**{accel}**')}")
        lines += _accel_evidence(accel, machines)
    if len(accels) > 1:
        lines.append("")
        lines.append("**The results mix accelerators**: compare figures only within one accelerator.")
    return "\n".join(lines)


def _accel_evidence(accel: str, machines: list[Doc]) -> list[str]:
    """What the machines recorded about the choice: /dev/kvm present or not, and the probe's verdict."""
    lines = []
    for m in machines:
        if m.get("accel") != accel:
            continue
        if accel == "tcg" and isinstance(m.get("kvm_device"), bool):
            lines.append(f"`/dev/kvm` {'exists' if m['kvm_device'] else 'does not exist'} on this machine.")
        if m.get("accel_reason"):
            reason = str(m["accel_reason"]).replace("```", "'''")  # cannot close the block early
            lines += ["The accelerator probe recorded:", "", "```text", reason, "```"]
        if lines:
            return ["", *lines]
    return []


def runs_section(results: dict[str, Doc]) -> str:
    rows = []
    for name, doc in results.items():
        machine = doc.get("machine") or {}
        accel = doc.get("accel") or machine.get("accel") or "—"
        smoke = " (smoke: too few samples to mean anything)" if doc.get("smoke") else ""
        rows.append([f"`{name}`", str(machine.get("git_rev", "?")), _when(doc), str(accel), smoke or "full"])
    return "## Runs\n\n" + table(["benchmark", "revision", "started", "accel", "mode"], rows)


def latency_rows(results: dict[str, Doc]) -> list[Summary]:
    return [s for name, doc in results.items() for s in summaries(name, doc)]


def latency_section(rows: list[Summary], results: dict[str, Doc]) -> str:
    body = table(
        ["benchmark", "mode", "n", "P50 (ms)", "P90 (ms)", "P99 (ms)"],
        [
            [f"`{s.benchmark}`", s.mode or "—", str(s.samples), ms(s.p50_ms), ms(s.p90_ms), ms(s.p99_ms)]
            for s in rows
        ],
    )
    what = [f"- `{name}`: {doc['what']}" for name, doc in results.items() if isinstance(doc.get("what"), str)]
    return "\n".join(
        [
            "## Latency",
            "",
            "Percentiles interpolate between order statistics (type 7): a P99 is not the maximum. "
            "A P99 from fewer than 100 samples is close to the maximum and says little.",
            "",
            body,
            "",
            "What each benchmark measures:",
            "",
            *what,
        ]
    )


def phase_segments(phases: dict[str, Doc]) -> list[tuple[str, float]]:
    """Cumulative phase P50s turned into per-phase durations (differences of consecutive P50s)."""
    segments, before = [], 0.0
    for phase, summary in phases.items():
        at = float(summary["p50_ms"])
        segments.append((phase, max(at - before, 0.0)))
        before = max(before, at)
    return segments


def phase_section(results: dict[str, Doc], plot_dir: Path, link: str) -> tuple[str, list[Path]]:
    parts, written = ["## Where the time goes", ""], []
    parts.append(
        "Phases are cumulative from the call: each column is the time at which that phase had ended "
        "(P50 and P99 over all samples). The bars show P50 differences between consecutive phases."
    )
    for name, title in PHASE_SOURCES:
        rows = [s for s in summaries(name, results.get(name, {})) if s.phases]
        if not rows:
            continue
        phases = list(dict.fromkeys(p for s in rows for p in s.phases))
        cells = []
        for s in rows:
            cells.append([s.mode or "—"] + [_p50_p99(s.phases.get(p)) for p in phases])
        parts += ["", f"### {title} (`{name}`)", "", table(["mode", *phases], cells)]
        bars = {s.mode or name: phase_segments(s.phases) for s in rows}
        svg = plots.phase_bars(bars, f"{title}: phases (P50, ms)", plot_dir / f"phases-{name}.svg")
        written.append(svg)
        parts += ["", f"![{title} phases]({link}/{svg.name})"]
    return ("\n".join(parts) if written else ""), written


def _p50_p99(summary: Doc | None) -> str:
    if summary is None:
        return "—"
    return f"{ms(number_or_none(summary.get('p50_ms')))} / {ms(number_or_none(summary.get('p99_ms')))}"


def cdf_section(rows: list[Summary], plot_dir: Path, link: str) -> tuple[str, list[Path]]:
    parts, written = ["## Latency distributions", ""], []
    by_benchmark: dict[str, dict[str, tuple[float, ...]]] = {}
    for s in rows:
        if s.values_ms:
            by_benchmark.setdefault(s.benchmark, {})[s.mode or s.benchmark] = s.values_ms
    if not by_benchmark:
        return "", []
    for name, curves in by_benchmark.items():
        svg = plots.cdf(dict(curves), f"{name}: latency CDF", plot_dir / f"cdf-{name}.svg")
        written.append(svg)
        parts.append(f"![{name} latency CDF]({link}/{svg.name})")
        parts.append("")
    return "\n".join(parts), written


def curve_section(results: dict[str, Doc], plot_dir: Path, link: str) -> tuple[str, list[Path]]:
    parts, written = [], []
    for name, doc in results.items():
        points = series(doc)
        if not points:
            continue
        xkey = "sandboxes" if "sandboxes" in points[0] else next(iter(points[0]))
        keys = [k for k, v in points[0].items() if k != xkey and isinstance(v, int | float)]
        usable = [p for p in points if all(isinstance(p.get(k), int | float) for k in [xkey, *keys])]
        if not keys or not usable:
            continue
        ys = {k: [float(p[k]) for p in usable] for k in keys}
        svg = plots.curves(
            [float(p[xkey]) for p in usable], ys, xkey, f"{name}", plot_dir / f"curve-{name}.svg"
        )
        written.append(svg)
        rows = [[str(p[xkey]), *(number(float(p[k])) for k in keys)] for p in usable]
        parts += [
            f"### `{name}` curve",
            "",
            table([xkey, *keys], rows),
            "",
            f"![{name}]({link}/{svg.name})",
            "",
        ]
    if not parts:
        return "", []
    return "\n".join(["## Curves", "", *parts]), written


def figures_section(results: dict[str, Doc]) -> str:
    parts = ["## Other figures", ""]
    for name, doc in results.items():
        exclude = tuple(other for other in SHARED_RUN if other != name) if name in SHARED_RUN else ()
        found = figures(doc, exclude)
        if found:
            parts += [f"`{name}`: " + ", ".join(f"{key} = {number(value)}" for key, value in found), ""]
    return "\n".join(parts) if len(parts) > 2 else ""


def ours(results: dict[str, Doc], where: Ours | None) -> str:
    """Our figure that a claimed or published one is set against, read from the results."""
    if where is None:
        return "—"
    value = value_at(results, where.benchmark, where.path, where.field)
    if value is None:
        return f"not in these results ({where.label})"
    label = where.label
    doc = results[where.benchmark]
    if where.per_core:
        cores = value_at(results, where.benchmark, ("machine",), "cores")
        if not cores:
            return f"not in these results ({where.label}: cores unrecorded)"
        value, label = value / cores, f"{label}, {cores:g} cores"
    if where.context and where.context[0] in doc:
        label = f"{label}, {where.context[1].format(doc[where.context[0]])}"
    shown = ms(value) + " ms" if where.unit == "ms" else number(round(value, 3), where.unit)
    return f"{shown} ({label})"


def claims_section(results: dict[str, Doc]) -> str:
    claims = table(
        ["original design claimed", "what produced it", "measured here"],
        [[c.figure, c.measured, ours(results, c.ours)] for c in CLAIMS],
    )
    published = table(
        ["system", "published figure", "what it measures", "conditions", "source", "Tartarus here"],
        [
            [
                p.system,
                p.figure,
                p.measures,
                p.conditions,
                f"[{p.cite}]({_url(p.source)})",
                ours(results, p.ours),
            ]
            for p in PUBLISHED
        ],
    )
    accels = ", ".join(accelerators(results)) or "unrecorded"
    return "\n".join(
        [
            "## Against the original claims and comparable systems",
            "",
            "The original design's figures were not measurements of a running system:",
            "",
            claims,
            "",
            "Published figures of comparable systems, as their authors state them (on bare-metal KVM hosts; "
            f"the figures here ran under {accels}). What is measured differs row by row: read the columns. "
            "Only figures with a primary source are listed (none was found for gVisor or Kata Containers).",
            "",
            published,
        ]
    )


def _url(url: str) -> str:
    """Parentheses escaped, so that Markdown renderers do not end the link early."""
    return url.replace("(", "%28").replace(")", "%29")


def render(results: dict[str, Doc], plot_dir: Path, link: str) -> tuple[str, list[Path]]:
    """The Markdown report and the SVG files it links (written into `plot_dir`, linked as `link/`)."""
    rows = latency_rows(results)
    phases, phase_svgs = phase_section(results, plot_dir, link)
    cdfs, cdf_svgs = cdf_section(rows, plot_dir, link)
    curve_md, curve_svgs = curve_section(results, plot_dir, link)
    smoke = any(doc.get("smoke") for doc in results.values())
    sections = [
        "# Tartarus benchmarks",
        "",
        "Generated by `tartarus bench report` from the JSON results of `tartarus bench all`; "
        "every figure below comes from those files.",
        "**Smoke run**: too few samples to mean anything; it only shows that every benchmark runs."
        if smoke
        else "",
        machine_section(results),
        runs_section(results),
        latency_section(rows, results),
        cdfs,
        phases,
        curve_md,
        figures_section(results),
        claims_section(results),
    ]
    text = "\n\n".join(s for s in sections if s).replace("\n\n\n", "\n\n")
    return text.rstrip() + "\n", phase_svgs + cdf_svgs + curve_svgs


def write_report(json_dir: Path, output: Path) -> list[Path]:
    """Write `output` and its plots (in `<output stem>-plots/` beside it); the plots written."""
    results = load_results(json_dir)
    plot_dir = output.parent / f"{output.stem}-plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for old in plot_dir.glob("*.svg"):  # this directory is the report's own: no stale plots
        old.unlink()
    text, written = render(results, plot_dir, plot_dir.name)
    output.write_text(text)
    return written
