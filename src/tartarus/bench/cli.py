"""`tartarus bench NAME`: run a benchmark, print a summary, write JSON with machine and sample counts."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tartarus.bench.machine import machine_info
from tartarus.bench.runtime import run_bench

if TYPE_CHECKING:
    from tartarus.bench.coldstart import WarmLoads
    from tartarus.sandbox.backend import Backend

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


def _measure(name: str, steps: int | None, runner: Runner) -> dict[str, Any]:
    """Run a benchmark under a progress bar of `steps` (None: open-ended); its result with machine,
    accelerator, revision."""
    from tartarus.bootfiles.kernel import kernel_path
    from tartarus.runtime.accel import choose_accel

    logging.basicConfig(level=logging.WARNING)
    accel = choose_accel(kernel_path())
    started = time.time()
    with Progress(
        TextColumn(f"bench {name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as bar:
        task = bar.add_task(name, total=steps)
        result = runner(lambda n: bar.advance(task, n))
    # What ran the sandboxes measured: the result's own word (gvisor-start), each of a side-by-side run's
    # (compute: "host+gvisor+tcg"), else the VM's.
    backends = result.get("backends")
    vm = "kvm" if accel == "kvm" else "tcg"
    backend = result.get("backend") or ("+".join(backends) if isinstance(backends, dict) else vm)
    doc = {
        "benchmark": name, **result, "accel": accel, "backend": backend, "machine": machine_info(accel),
        "started_at": started,
    }  # fmt: skip
    if "p50_ms" in doc:
        err.print(
            f"{name}: n={doc['samples']} p50={doc['p50_ms']:.1f} ms p99={doc['p99_ms']:.1f} ms "
            f"max={doc['max_ms']:.1f} ms (accel {accel})"
        )
    _print_loads(doc)
    for each, part in (backends or {}).items():  # cold-start per backend
        if isinstance(part, dict) and isinstance(part.get("p50_ms"), float):
            err.print(
                f"{each}: cold n={part['samples']} p50={part['p50_ms']:.1f} ms p99={part['p99_ms']:.1f} ms"
            )
            _print_loads(part)
    return doc


def _print_loads(doc: dict[str, Any]) -> None:
    for part in ("warm", "steady", "burst", "api_warm"):  # cold-start's ready-pool loads
        if isinstance(doc.get(part), dict):
            d = doc[part]
            err.print(
                f"  {part}: n={d['samples']} p50={d['p50_ms']:.1f} ms p99={d['p99_ms']:.1f} ms "
                f"hit rate {d['hit_rate']:.1%}"
            )


def _run(name: str, steps: int | None, json_path: Path | None, runner: Runner) -> None:
    """Run a benchmark, print its summary, and write its result."""
    _emit(_measure(name, steps, runner), json_path)


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
    warm_samples: Annotated[int, typer.Option(help="creates served by a ready sandbox (0: skip)")] = 200,
    ready: Annotated[int, typer.Option(help="ready sandboxes kept for the warm part", min=1)] = 2,
    rate: Annotated[float, typer.Option(help="creates per second, steady arrivals")] = 2.0,
    steady_samples: Annotated[int, typer.Option(help="creates at the steady rate", min=1)] = 200,
    burst: Annotated[int, typer.Option(help="creates arriving at once", min=1)] = 10,
    bursts: Annotated[int, typer.Option(help="bursts", min=1)] = 5,
    template: TemplateOpt = "python-ds",
    backend: Annotated[
        str | None,
        typer.Option(help="backends to measure in one run, comma-separated (gvisor,tcg); default: the VM's"),
    ] = None,
    json_out: JsonOut = None,
) -> None:
    """Create → run_code('1+1') answered: restoring the template snapshot (cold: sequential and
    concurrent) and served by a ready sandbox (warm: sequential, steady arrivals, bursts), per backend
    with --backend."""
    from tartarus.bench.coldstart import WarmLoads
    from tartarus.sandbox.backend import parse_backend

    backends = tuple(parse_backend(b.strip(), "--backend") for b in (backend or "").split(",") if b.strip())
    warm = WarmLoads(warm_samples, ready, rate, steady_samples, burst, bursts)
    vm_steps = samples * (2 if concurrency > 1 else 1) + warm.steps
    steps = sum(2 * samples + warm.steps if b == "gvisor" else vm_steps for b in backends) or vm_steps
    runner = _cold_start(template, samples, concurrency, api_samples, warm, backends)
    _run("cold-start", steps, json_out, runner)


def _cold_start(
    template: str,
    samples: int,
    concurrency: int,
    api_samples: int,
    warm: WarmLoads | None = None,
    backends: tuple[Backend, ...] = (),
) -> Runner:
    from tartarus.bench.coldstart import bench_cold_start

    return lambda p: asyncio.run(
        bench_cold_start(template, samples, concurrency, api_samples, p, warm, backends)
    )


DirtyOpt = Annotated[int, typer.Option("--dirty-mib", help="memory the sandbox owns (MiB)", min=0)]
Concurrency = Annotated[int, typer.Option("--concurrency", "-c", min=1, max=16)]
Baseline = Annotated[int, typer.Option(help="cycles with the unfiltered QEMU stream (0: skip)", min=0)]


SleepBackends = Annotated[
    list[str] | None,
    typer.Option("--backend", help="vm (the host's: kvm or tcg) and/or gvisor; repeat for both in one run"),
]


def _sleep(
    primary: str,
    samples: int,
    concurrency: int,
    dirty_mib: int,
    baseline: int,
    template: str,
    backends: list[str] | None = None,
) -> Runner:
    """Hibernate/wake cycles; `primary` ("wake" or "hibernate") is the headline figure (the first
    backend's)."""
    from tartarus.bench.hibernation import bench_sleep

    which = tuple(backends or ["vm"])

    def run(progress: Callable[[int], None]) -> dict[str, Any]:
        result = asyncio.run(
            bench_sleep(template, samples, concurrency, dirty_mib, baseline, progress, which)
        )
        return {**result["sequential"][primary], **result}

    return run


def _sleep_steps(samples: int, concurrency: int, baseline: int, backends: list[str] | None) -> int:
    which = backends or ["vm"]
    per = samples * (2 if concurrency > 1 else 1)
    return per * len(which) + (baseline if "vm" in which else 0)


@bench_app.command()
def wake(
    samples: Samples = 200,
    concurrency: Concurrency = 4,
    dirty_mib: DirtyOpt = 50,
    baseline: Baseline = 20,
    template: TemplateOpt = "python-ds",
    backend: SleepBackends = None,
    json_out: JsonOut = None,
) -> None:
    """Wake call (no process held) → run_code answered with the sandbox's memory intact."""
    steps = _sleep_steps(samples, concurrency, baseline, backend)
    runner = _sleep("wake", samples, concurrency, dirty_mib, baseline, template, backend)
    _run("wake", steps, json_out, runner)


@bench_app.command()
def hibernate(
    samples: Samples = 200,
    concurrency: Concurrency = 4,
    dirty_mib: DirtyOpt = 50,
    baseline: Baseline = 20,
    template: TemplateOpt = "python-ds",
    backend: SleepBackends = None,
    json_out: JsonOut = None,
) -> None:
    """Hibernate call → the sandbox on disk and its VMM process gone; bytes written per hibernation."""
    steps = _sleep_steps(samples, concurrency, baseline, backend)
    runner = _sleep("hibernate", samples, concurrency, dirty_mib, baseline, template, backend)
    _run("hibernate", steps, json_out, runner)


def _quarantine(template: str, admission_samples: int, samples: int, live_samples: int) -> Runner:
    from tartarus.bench.quarantine import bench_quarantine

    return lambda p: asyncio.run(bench_quarantine(template, admission_samples, samples, live_samples, p))


@bench_app.command()
def quarantine(
    admission_samples: Annotated[int, typer.Option("--admission-samples", min=1)] = 10000,
    samples: Annotated[int, typer.Option("--samples", "-n", min=1, help="creates per variant")] = 200,
    live_samples: Annotated[int, typer.Option("--live-samples", min=1)] = 30,
    template: TemplateOpt = "python-ds",
    json_out: JsonOut = None,
) -> None:
    """Admission decision overhead, create with/without a quarantine verdict, live quarantine time."""
    steps = admission_samples + 3 * samples + live_samples
    result = _measure("quarantine", steps, _quarantine(template, admission_samples, samples, live_samples))
    create = result["create"]
    err.print(
        f"quarantine: admission n={result['admission']['samples']} p99={result['overhead_p99_ms']:.4f} ms; "
        f"create p50/p99 admitted {create['admitted']['p50_ms']:.1f}/{create['admitted']['p99_ms']:.1f} ms, "
        f"quarantined {create['quarantined']['p50_ms']:.1f}/{create['quarantined']['p99_ms']:.1f} ms "
        f"(n={create['admitted']['samples']} each); containment p99 allow "
        f"{create['admitted_allow']['containment']['p99_ms']:.2f} ms; live quarantine "
        f"p99={result['live_quarantine_ms']:.1f} ms (n={result['live_quarantine']['samples']})"
    )
    _emit(result, json_out)


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


@bench_app.command()
def compute(
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", min=1)] = 5,
    vm: Annotated[bool, typer.Option(help="also in a VM sandbox (slow under TCG)")] = True,
    template: TemplateOpt = "python-ds",
    json_out: JsonOut = None,
) -> None:
    """Python loop, numpy SVD 300² and matmul 1000² (1 BLAS thread), 2,000 files: host, gVisor and VM."""
    from tartarus.bench.compute import WORKLOADS, bench_compute

    doc = _measure("compute", 2 + vm, lambda p: bench_compute(template, repetitions, p, vm=vm))
    for backend, result in doc["backends"].items():
        ratios = ", ".join(f"{w} {result['ratio_to_host'][w]:.2f}x" for w in WORKLOADS)
        err.print(f"compute {backend} (BLAS {result['blas_core']}): {ratios}")
    _emit(doc, json_out)


@bench_app.command("gvisor-start")
def gvisor_start(
    samples: Samples = 30, template: TemplateOpt = "python-ds", json_out: JsonOut = None
) -> None:
    """gVisor: restore → run_code('1+1') answered; a fresh spawn → python3 -c 'print(1)' answered."""
    from tartarus.bench.gvisor_start import bench_gvisor_start

    _run(
        "gvisor-start", 2 * samples, json_out, lambda p: asyncio.run(bench_gvisor_start(template, samples, p))
    )


@bench_app.command("e2b")
def e2b(
    samples: Samples = 200,
    template: TemplateOpt = "python-ds",
    rounds: Annotated[int, typer.Option(help="alternating rounds per side", min=1)] = 4,
    json_out: JsonOut = None,
) -> None:
    """Create → `commands.run("echo hi")`, and create → `run_code("1+1")`, through E2B's unmodified SDKs
    and through Tartarus's, in one run."""
    from tartarus.bench.e2b_compare import WORKLOADS, run_e2b

    steps = 2 * len(WORKLOADS) * samples
    _run("e2b", steps, json_out, lambda p: run_e2b(samples, template, rounds, p))


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
    _emit(_image_convert(cold, warm, fstype), json_out)


def _image_convert(cold: int, warm: int, fstype: str) -> dict[str, Any]:
    from tartarus.bench.images import bench_image_convert

    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    result = bench_image_convert(cold, warm, fstype, lambda message: err.print(f"[dim]{message}[/dim]"))
    doc = {"benchmark": "image-convert", **result, "machine": machine_info(), "started_at": started}
    err.print(
        f"image-convert: cold {doc['cold_s']:.2f} s, warm {doc['warm_ms']:.1f} ms, baseline "
        f"{doc['baseline_s']:.2f} s, ratio {doc['ratio']:.2f}, peak RSS {doc['peak_rss_mb']:.0f} MB"
    )
    return doc


def _density(template: str, max_sandboxes: int, samples: int) -> Runner:
    from tartarus.bench.density import bench_density

    return lambda p: asyncio.run(bench_density(template, max_sandboxes, p, samples))


def _throughput(template: str, seconds: float) -> Runner:
    from tartarus.bench.throughput import bench_throughput

    return lambda p: asyncio.run(bench_throughput(template, LEVELS, seconds, p))


LEVELS = [1, 2, 4]


@bench_app.command()
def density(
    max_sandboxes: Annotated[int, typer.Option("--max", min=1, max=2000)] = 32,
    samples: Annotated[int, typer.Option("--samples", "-n", min=1, help="creates, empty and loaded")] = 40,
    template: TemplateOpt = "python-ds",
    json_out: JsonOut = None,
) -> None:
    """Idle sandboxes this machine holds: host memory (PSS, broken down) and idle CPU per sandbox, and a
    new sandbox's create -> run_code with them held against the empty machine's."""
    steps = max_sandboxes + 2 * samples
    _run("density", steps, json_out, _density(template, max_sandboxes, samples))


@bench_app.command()
def throughput(
    seconds: Annotated[float, typer.Option(help="per concurrency level", min=1)] = 20,
    template: TemplateOpt = "python-ds",
    json_out: JsonOut = None,
) -> None:
    """Sandboxes created (and answering) per second through the API at concurrency 1, 2 and 4."""
    _run("throughput", len(LEVELS), json_out, _throughput(template, seconds))


@bench_app.command()
def cluster(
    samples: Samples = 200,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, max=64)] = 8,
    file_mib: Annotated[int, typer.Option("--file-mib", min=1)] = 50,
    state_samples: Annotated[int, typer.Option("--state-samples", min=1)] = 5,
    creates: Annotated[int, typer.Option("--creates", min=0, help="creates per path (0: no agent)")] = 200,
    calls: Annotated[int, typer.Option("--calls", min=1, help="exec and GET round trips per path")] = 500,
    wakes: Annotated[
        int, typer.Option("--wakes", min=0, help="wakes on another node from the object store (0: none)")
    ] = 20,
    wake_mib: Annotated[int, typer.Option("--wake-mib", min=1, help="memory the woken sandbox owns")] = 50,
    template: TemplateOpt = "python-ds",
    json_out: JsonOut = None,
) -> None:
    """Placement decision latency at 3 and 64 simulated nodes, concurrent placement, S3 chunk throughput;
    with --creates, a real agent and gateway: create, exec and GET through the gateway vs direct; with
    --wakes, two agents with an object store: a sandbox owning --wake-mib MiB woken on the other node."""
    from tartarus.bench.cluster import NODE_SIZES, bench_cluster
    from tartarus.bench.machine import machine_info

    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    steps = samples * (len(NODE_SIZES) + 1) + state_samples + (creates + calls if creates else 0) + wakes
    with Progress(
        TextColumn("bench cluster"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as bar:
        task = bar.add_task("cluster", total=steps)
        result = bench_cluster(
            samples,
            concurrency,
            file_mib,
            state_samples,
            lambda n: bar.advance(task, n),
            creates=creates,
            calls=calls,
            template=template,
            wakes=wakes,
            wake_mib=wake_mib,
        )
    for name, doc in result["placement"].items():
        err.print(
            f"placement {name}: n={doc['samples']} p50={doc['p50_ms']:.3f} ms p99={doc['p99_ms']:.3f} ms"
        )
    con = result["concurrent"]
    err.print(
        f"concurrent: {con['demands']} demands from {con['gateways']} connections, "
        f"room for {con['capacity']}: placed {con['placed']}, no capacity {con['no_capacity']}, "
        f"errors {con['errors']}, over capacity {con['nodes_over_capacity'] or 'none'}"
    )
    st = result["state_store"]
    err.print(
        f"state store {st['file_mib']} MiB: upload {st['upload']['mib_per_s_p50']} MiB/s, "
        f"download {st['download']['mib_per_s_p50']} MiB/s (P50 of {st['upload']['samples']})"
    )
    gw = result.get("gateway")
    if gw:
        for what in ("create", "exec_true", "get_sandbox"):
            doc, over = gw[what], gw[what]["gateway_overhead"]
            err.print(
                f"{what}: gateway p50={doc['gateway']['p50_ms']:.2f} p99={doc['gateway']['p99_ms']:.2f} ms, "
                f"direct p50={doc['direct']['p50_ms']:.2f} p99={doc['direct']['p99_ms']:.2f} ms "
                f"(n={doc['gateway']['samples']} each); overhead p50={over['p50_ms']:.2f} "
                f"p99={over['p99_ms']:.2f} ms"
            )
    moved = result.get("wake_on_another_node")
    if moved:
        first, fetch, restore = moved["first_call_after_hibernation"], moved["fetch"], moved["restore"]
        err.print(
            f"wake on another node ({moved['owned_mib']} MiB owned, fetched {moved['fetched_mib_p50']} MiB, "
            f"n={first['samples']}): first call p50={first['p50_ms']:.0f} p99={first['p99_ms']:.0f} ms; "
            f"fetch p50={fetch['p50_ms']:.0f} p99={fetch['p99_ms']:.0f} ms; "
            f"restore p50={restore['p50_ms']:.0f} p99={restore['p99_ms']:.0f} ms"
        )
    _emit({"benchmark": "cluster", **result, "machine": machine_info(), "started_at": started}, json_out)


@bench_app.command("all")
def all_(
    json_dir: Annotated[Path, typer.Option("--json-dir", help="one JSON file per benchmark goes here")],
    smoke: Annotated[
        bool, typer.Option(help="a few samples each: proves every benchmark runs, measures nothing")
    ] = False,
    template: TemplateOpt = "python-ds",
) -> None:
    """Every benchmark, one JSON each (machine, accelerator, git revision and sample counts in each)."""
    from tartarus.bench.runtime import run_bench

    n, c = (3, 2) if smoke else (200, 4)

    def few(small: int, full: int) -> int:
        return small if smoke else full

    from tartarus.bench.coldstart import WarmLoads

    warm = WarmLoads(n, 2, 2.0, few(3, 200), few(3, 10), few(1, 5))
    # image-convert first: it reports the peak memory of its conversion processes, which nothing else
    # this process started may have inflated.
    docs = [_image_convert(few(1, 5), few(2, 20), "ext4")]
    sleep = _measure("wake", n * 2 + few(1, 20), _sleep("wake", n, c, 50, few(1, 20), template))
    docs += [
        _measure("cold-start", n * 2 + warm.steps, _cold_start(template, n, c, few(2, 50), warm)),
        sleep,
        {**sleep, **sleep["sequential"]["hibernate"], "benchmark": "hibernate"},
        _measure("boot", few(1, 30), lambda p: run_bench("boot", template, few(1, 30), p)),
        _measure("exec", few(5, 200), lambda p: run_bench("exec", template, few(5, 200), p)),
        _measure("density", few(2, 500) + 2 * few(2, 40), _density(template, few(2, 500), few(2, 40))),
        _measure("throughput", len(LEVELS), _throughput(template, few(2, 20))),
        _measure(
            "quarantine",
            few(1000 + 3 * 2 + 2, 10000 + 3 * 200 + 30),
            _quarantine(template, few(1000, 10000), few(2, 200), few(2, 30)),
        ),
    ]
    for doc in docs:
        if smoke:
            doc["smoke"] = True
        _emit(doc, json_dir / f"{doc['benchmark']}.json")
    err.print(f"wrote {len(docs)} results to {json_dir}")


@bench_app.command()
def report(
    json_dir: Annotated[Path, typer.Option("--json-dir", help="the JSON results of `bench all`")],
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("BENCHMARKS.md"),
) -> None:
    """BENCHMARKS.md from JSON results: tables, SVG plots, claimed and published figures side by side."""
    from tartarus.errors import TartarusError

    try:
        from tartarus.bench.report import write_report
    except ModuleNotFoundError as e:
        err.print(
            f"[red]error[/red]: {e.name} is missing; install the report extra: pip install 'tartarus[report]'"
        )
        raise typer.Exit(2) from e
    try:
        written = write_report(json_dir, output)
    except TartarusError as e:
        err.print(f"[red]error[/red] ({e.code}): {e.message}")
        raise typer.Exit(2) from e
    err.print(f"wrote {output} and {len(written)} plots")


@bench_app.command()
def compare(
    rev_a: Annotated[str, typer.Argument(help="baseline revision (A)")],
    rev_b: Annotated[str, typer.Argument(help="candidate revision (B)")],
    benchmark: Annotated[
        str, typer.Option("--benchmark", "-b", help="boot, exec, cold-start, wake, hibernate")
    ],
    rounds: Annotated[int, typer.Option("--rounds", "-r", min=1)] = 5,
    samples: Samples = 20,
    bench_args: Annotated[
        list[str] | None, typer.Option("--arg", help="passed to the benchmark, e.g. --arg=--concurrency=1")
    ] = None,
    json_out: JsonOut = None,
) -> None:
    """Ratio B/A of one benchmark run alternately on two git revisions, with a bootstrap 95% interval."""
    from tartarus.bench.compare import compare as run_compare
    from tartarus.errors import TartarusError

    logging.basicConfig(level=logging.WARNING)
    try:
        doc = run_compare(rev_a, rev_b, benchmark, rounds, samples, bench_args or [], err.print)
    except TartarusError as e:
        err.print(f"[red]error[/red] ({e.code}): {e.message}")
        raise typer.Exit(2) from e
    for key in ("median", "p99"):
        r = doc["ratio_b_over_a"][key]
        if r:
            err.print(
                f"{benchmark} {key} B/A = {r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}] "
                f"(95%, {r['runs_a']}+{r['runs_b']} runs, n={r['n_a']}+{r['n_b']}): {r['verdict']}"
            )
    _emit(doc, json_out)
