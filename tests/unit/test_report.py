"""`bench report` on a small, made-up set of results: its tables carry the JSON's numbers, its plots exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from tartarus.bench.report import ms, write_report
from tartarus.bench.stats import summary_ms
from tartarus.errors import InvalidArgument

MACHINE = {
    "cpu": "Test CPU",
    "cores": 2,
    "memory_gib": 23.5,
    "host_kernel": "6.1.0-test",
    "os": "Debian GNU/Linux 12 (bookworm)",
    "qemu": "QEMU emulator version 7.2.0",
    "accel": "tcg",
    "accel_reason": "probe VM exited under KVM: Assertion `ret == n' failed.",
    "kvm_device": True,
    "git_rev": "abc1234",
}


def _summary(base_ms: float, n: int) -> dict[str, Any]:
    return summary_ms([(base_ms + 0.37 * i) / 1000 for i in range(n)])


def _phased(base_ms: float, n: int) -> dict[str, Any]:
    phases = {"state_loaded": 0.1, "guest_resumed": 0.2, "first_answer": 0.5, "run_code": 1.0}
    return {
        **_summary(base_ms, n),
        "phases_cumulative": {p: _summary(base_ms * f, n) for p, f in phases.items()},
    }


def _docs() -> dict[str, dict[str, Any]]:
    common: dict[str, Any] = {"accel": "tcg", "machine": MACHINE, "started_at": 1795716462.0}
    sleep: dict[str, Any] = {
        "sequential": {"concurrency": 1, "wake": _phased(150, 12), "hibernate": _phased(300, 12)},
        "concurrent": {"concurrency": 2, "wake": _phased(250, 12), "hibernate": _phased(500, 12)},
        "baseline_full_stream": {"concurrency": 1, "wake": _phased(400, 3), "hibernate": _phased(700, 3)},
        "what": "hibernate and wake",
    }
    return {
        "cold-start": {
            "benchmark": "cold-start",
            **_phased(90, 20),
            "concurrency": 1,
            "concurrent": {**_phased(190, 20), "concurrency": 2},
            "api": _summary(130, 10),
            "memory": {"pss_mib_per_sandbox_mean": 30.9},
            "what": "restore until run_code answers",
            **common,
        },
        "wake": {"benchmark": "wake", **sleep["sequential"]["wake"], **sleep, **common},
        "hibernate": {"benchmark": "hibernate", **sleep["sequential"]["hibernate"], **sleep, **common},
        "boot": {  # an older result: no values_ms, so a table row but no CDF
            "benchmark": "boot",
            **{k: v for k, v in _summary(1200, 5).items() if k != "values_ms"},
            **common,
        },
        "density": {
            "benchmark": "density",
            "samples": 3,
            "curve": [
                {"sandboxes": i, "pss_total_mib": 31.5 * i, "mem_available_mib": 20000 - 32 * i}
                for i in (1, 2, 3)
            ],
            "pss_mib_per_sandbox": 31.5,
            **common,
        },
        "image-convert": {
            "benchmark": "image-convert",
            "cold_s": 2.092,
            "warm": _summary(3.2, 5),
            "machine": {**MACHINE, "accel": None},
        },
    }


@pytest.fixture
def report(tmp_path: Path) -> tuple[str, Path, dict[str, dict[str, Any]]]:
    results = tmp_path / "results"
    results.mkdir()
    docs = _docs()
    for name, doc in docs.items():
        (results / f"{name}.json").write_text(json.dumps(doc))
    output = tmp_path / "out" / "BENCHMARKS.md"
    written = write_report(results, output)
    assert written and all(p.is_file() for p in written)
    return output.read_text(), output, docs


def _latency_rows(text: str) -> dict[tuple[str, str], list[str]]:
    section = text.split("## Latency\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("`"):
            rows[(cells[0].strip("`"), cells[1])] = cells[2:]
    return rows


def _close(cell: str, value: float) -> bool:
    return abs(float(cell) - value) <= max(0.006, 0.003 * value)  # the table rounds to 3 figures


def test_latency_table_carries_the_json_values(report: tuple[str, Path, dict[str, dict[str, Any]]]) -> None:
    text, _, docs = report
    rows = _latency_rows(text)
    expected = {
        ("cold-start", "sequential"): docs["cold-start"],
        ("cold-start", "2 at a time"): docs["cold-start"]["concurrent"],
        ("cold-start", "through the REST API"): docs["cold-start"]["api"],
        ("wake", "sequential"): docs["wake"]["sequential"]["wake"],
        ("wake", "2 at a time"): docs["wake"]["concurrent"]["wake"],
        ("wake", "baseline: full QEMU stream"): docs["wake"]["baseline_full_stream"]["wake"],
        ("hibernate", "sequential"): docs["hibernate"]["sequential"]["hibernate"],
        ("boot", "—"): docs["boot"],
        ("image-convert", "warm cache"): docs["image-convert"]["warm"],
    }
    assert set(expected) <= set(rows), sorted(rows)
    for key, summary in expected.items():
        n, p50, p90, p99 = rows[key]
        assert int(n) == summary["samples"], key
        for cell, field in ((p50, "p50_ms"), (p90, "p90_ms"), (p99, "p99_ms")):
            assert _close(cell, summary[field]), (key, field, cell, summary[field])
    # wake.json also holds the hibernate summaries of the same run: shown under hibernate only
    assert not any(b == "wake" and "hibernate" in m for b, m in rows)
    assert len([k for k in rows if k[0] == "wake"]) == 3


def test_phases_machine_and_accelerator(report: tuple[str, Path, dict[str, dict[str, Any]]]) -> None:
    text, _, docs = report
    assert "Test CPU, 2 cores, 23.5 GiB" in text and "QEMU emulator version 7.2.0" in text
    assert "**TCG**, QEMU's software emulation" in text
    assert "`/dev/kvm` exists on this machine" in text
    assert "```text\nprobe VM exited under KVM: Assertion `ret == n' failed.\n```" in text
    create = text.split("### create (`cold-start`)", 1)[1].split("###", 1)[0]
    guest_resumed = docs["cold-start"]["phases_cumulative"]["guest_resumed"]
    row = next(line for line in create.splitlines() if line.startswith("| sequential"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = [c.strip() for c in create.splitlines()[2].strip("|").split("|")]
    p50, p99 = cells[header.index("guest_resumed")].split(" / ")
    assert _close(p50, guest_resumed["p50_ms"]) and _close(p99, guest_resumed["p99_ms"])
    assert "### wake (`wake`)" in text


def test_plots_are_svg_and_linked(report: tuple[str, Path, dict[str, dict[str, Any]]]) -> None:
    text, output, _ = report
    plots = output.parent / "BENCHMARKS-plots"
    names = {p.name for p in plots.glob("*.svg")}
    assert {"cdf-cold-start.svg", "cdf-wake.svg", "phases-cold-start.svg", "phases-wake.svg"} <= names
    assert "curve-density.svg" in names
    assert "cdf-boot.svg" not in names  # no values_ms in boot.json
    for name in names:
        root = ElementTree.parse(plots / name).getroot()
        assert root.tag.endswith("svg")
        assert f"](BENCHMARKS-plots/{name})" in text
    assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", (plots / "cdf-wake.svg").read_text())  # no date


def test_claims_and_published_figures_read_our_side_from_the_json(
    report: tuple[str, Path, dict[str, dict[str, Any]]],
) -> None:
    text, _, docs = report
    section = text.split("## Against the original claims", 1)[1]
    claim = next(line for line in section.splitlines() if "cold start P99 81 ms" in line)
    assert "a mocked 50 ms sleep" in claim
    assert f"{ms(docs['cold-start']['p99_ms'])} ms (cold-start P99" in claim
    assert "quarantine overhead 0.08 µs" in section and "not in these results" in section
    assert "https://github.com/firecracker-microvm/firecracker/blob/" in section
    assert "%28docs%29" in section  # parentheses in a link target are escaped


def test_missing_directory_or_results_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a directory"):
        write_report(tmp_path / "nope", tmp_path / "B.md")
    with pytest.raises(InvalidArgument, match="no benchmark results"):
        write_report(tmp_path, tmp_path / "B.md")
    (tmp_path / "wake.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match=r"wake\.json"):
        write_report(tmp_path, tmp_path / "B.md")
    assert not (tmp_path / "B.md").exists()


def test_smoke_results_are_labelled_as_such(tmp_path: Path) -> None:
    doc = {"benchmark": "exec", **_summary(30, 3), "smoke": True, "accel": "kvm", "machine": MACHINE}
    (tmp_path / "exec.json").write_text(json.dumps(doc))
    write_report(tmp_path, tmp_path / "B.md")
    text = (tmp_path / "B.md").read_text()
    assert "**Smoke run**" in text and "smoke: too few samples" in text
    assert "**KVM**: hardware virtualisation" in text
