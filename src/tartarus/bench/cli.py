"""`tartarus bench NAME`: run a benchmark, print a summary, write JSON with machine and sample counts."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tartarus.bench.machine import machine_info
from tartarus.bench.runtime import run_bench

bench_app = typer.Typer(
    help="Benchmarks: several runs, true percentiles, JSON results.", no_args_is_help=True
)
err = Console(stderr=True)


def _emit(doc: dict[str, Any], json_path: Path | None) -> None:
    """Write a result document to `json_path`, or to stdout when none is given."""
    text = json.dumps(doc, indent=2)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
    else:
        print(text)


Runner = Callable[[Callable[[int], None]], dict[str, Any]]


def _run(name: str, steps: int | None, json_path: Path | None, runner: Runner) -> None:
    """Run a benchmark under a progress bar of `steps` (None: open-ended), then print and write its result."""
    from tartarus.guest.kernel import kernel_path
    from tartarus.runtime.accel import choose_accel

    logging.basicConfig(level=logging.WARNING)
    accel = choose_accel(kernel_path())
    started = time.time()
    with Progress(
        TextColumn(f"bench {name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as bar:
        task = bar.add_task(name, total=steps)
        result = runner(lambda n: bar.advance(task, n))
    doc = {"benchmark": name, **result, "accel": accel, "machine": machine_info(accel), "started_at": started}
    err.print(
        f"{name}: n={doc['samples']} p50={doc['p50_ms']:.1f} ms p99={doc['p99_ms']:.1f} ms "
        f"max={doc['max_ms']:.1f} ms (accel {accel})"
    )
    _emit(doc, json_path)


Samples = Annotated[int, typer.Option("--samples", "-n", min=1)]
JsonOut = Annotated[Path | None, typer.Option("--json", help="write the result here")]
TemplateOpt = Annotated[str, typer.Option("--template", "-t")]


@bench_app.command()
def boot(samples: Samples = 20, template: TemplateOpt = "python-ds", json_out: JsonOut = None) -> None:
    """Cold boot (no snapshot) to the guest agent answering."""
    _run("boot", samples, json_out, lambda p: run_bench("boot", template, samples, p))


@bench_app.command("exec")
def exec_(samples: Samples = 200, template: TemplateOpt = "python-ds", json_out: JsonOut = None) -> None:
    """Round trip of `true` in a running sandbox."""
    _run("exec", samples, json_out, lambda p: run_bench("exec", template, samples, p))


@bench_app.command("cold-start")
def cold_start(
    samples: Samples = 200,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, max=16)] = 4,
    api_samples: Annotated[int, typer.Option(help="also through the REST API (0: skip)")] = 50,
    template: TemplateOpt = "python-ds",
    json_out: JsonOut = None,
) -> None:
    """Create → run_code('1+1') answered, restoring the template snapshot (sequential and concurrent)."""
    from tartarus.bench.coldstart import bench_cold_start

    steps = samples * (2 if concurrency > 1 else 1)
    _run(
        "cold-start",
        steps,
        json_out,
        lambda p: asyncio.run(bench_cold_start(template, samples, concurrency, api_samples, p)),
    )


@bench_app.command()
def load(
    clients: Annotated[int, typer.Option("--clients", "-c", min=1, max=256)] = 32,
    duration: Annotated[float, typer.Option("--duration", "-d", min=1, help="seconds")] = 180,
    template: TemplateOpt = "python-ds",
    json_out: JsonOut = None,
) -> None:
    """Concurrent clients create, exec in and destroy sandboxes on a private daemon: errors, leaks, memory."""
    from tartarus.bench.load import run_load

    def run(progress: Callable[[int], None]) -> dict[str, Any]:
        result = run_load(clients, duration, template, progress=progress)
        err.print(
            f"load: {result['cycles']} cycles, {result['errors']} errors, "
            f"{result['sandboxes_left']} sandboxes and {result['vms_left_after_exit']} VMs left, "
            f"daemon RSS {result['daemon_rss_mib']}"
        )
        return result

    _run("load", None, json_out, run)


@bench_app.command("api-overhead")
def api_overhead(
    samples: Samples = 200, template: TemplateOpt = "python-ds", json_out: JsonOut = None
) -> None:
    """Sequential creates through the REST API: the control plane's time on top of the runtime's."""
    from tartarus.bench.load import run_api_overhead

    _run("api-overhead", samples, json_out, lambda p: run_api_overhead(samples, template, p))


@bench_app.command("image-convert")
def image_convert(
    cold: Annotated[
        int, typer.Option("--cold", help="cold conversions (each followed by a baseline run)", min=1)
    ] = 5,
    warm: Annotated[int, typer.Option("--warm", help="warm pulls", min=1)] = 20,
    fstype: Annotated[str, typer.Option(help="ext4 or erofs")] = "ext4",
    json_out: JsonOut = None,
) -> None:
    """python:3.11-slim equivalent from a local registry: cold, warm, and a skopeo+umoci+mkfs baseline."""
    from tartarus.bench.images import bench_image_convert

    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    result = bench_image_convert(cold, warm, fstype, lambda message: err.print(f"[dim]{message}[/dim]"))
    doc = {"benchmark": "image-convert", **result, "machine": machine_info(), "started_at": started}
    err.print(
        f"image-convert: cold {doc['cold_s']:.2f} s, warm {doc['warm_ms']:.1f} ms, baseline "
        f"{doc['baseline_s']:.2f} s, ratio {doc['ratio']:.2f}, peak RSS {doc['peak_rss_mb']:.0f} MB"
    )
    _emit(doc, json_out)
