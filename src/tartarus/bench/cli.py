"""`tartarus bench NAME`: run a benchmark, print a summary, write JSON with machine and sample counts."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tartarus.bench.machine import machine_info
from tartarus.bench.runtime import run_bench

bench_app = typer.Typer(
    help="Benchmarks: several runs, true percentiles, JSON results.", no_args_is_help=True
)
err = Console(stderr=True)


def _run(name: str, samples: int, template: str, json_path: Path | None) -> None:
    from tartarus.guest.kernel import kernel_path
    from tartarus.runtime.accel import choose_accel

    logging.basicConfig(level=logging.WARNING)
    accel = choose_accel(kernel_path())
    started = time.time()
    with Progress(
        TextColumn(f"bench {name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as bar:
        task = bar.add_task(name, total=samples)
        result = run_bench(name, template, samples, lambda n: bar.advance(task, n))
    doc = {"benchmark": name, **result, "accel": accel, "machine": machine_info(accel), "started_at": started}
    err.print(
        f"{name}: n={doc['samples']} p50={doc['p50_ms']:.1f} ms p99={doc['p99_ms']:.1f} ms "
        f"max={doc['max_ms']:.1f} ms (accel {accel})"
    )
    text = json.dumps(doc, indent=2)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
    else:
        print(text)


Samples = Annotated[int, typer.Option("--samples", "-n", min=1)]
JsonOut = Annotated[Path | None, typer.Option("--json", help="write the result here")]
TemplateOpt = Annotated[str, typer.Option("--template", "-t")]


@bench_app.command()
def boot(samples: Samples = 20, template: TemplateOpt = "python-ds", json_out: JsonOut = None) -> None:
    """Cold boot (no snapshot) to the guest agent answering."""
    _run("boot", samples, template, json_out)


@bench_app.command("exec")
def exec_(samples: Samples = 200, template: TemplateOpt = "python-ds", json_out: JsonOut = None) -> None:
    """Round trip of `true` in a running sandbox."""
    _run("exec", samples, template, json_out)
