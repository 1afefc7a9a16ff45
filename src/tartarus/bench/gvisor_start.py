"""`bench gvisor-start`: a gVisor sandbox from spawn to its first answer, fresh and restored.

Fresh: each sample starts a container of the template (runsc create + start, the agent's HELLO) and
runs `python3 -c 'print(1)'` through the agent to its output. Restored: a golden sandbox whose warm
code interpreter has imported the template's modules (numpy, pandas, sklearn) is checkpointed once;
each sample restores it under a new id (also into a container created beforehand, as a pool would keep
them), adopts the interpreter and times `run_code("1+1")` to its answer. Destroys are not timed. The
phases say where the time goes: runsc up, agent ready, the answer.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tartarus.bench.stats import summary_ms
from tartarus.errors import InvalidArgument
from tartarus.gvisor.container import GvisorContainer, start_container
from tartarus.gvisor.rootfs import template_tree
from tartarus.gvisor.spec import BundleSpec
from tartarus.runtime.agent import Output
from tartarus.runtime.interpreter import CodeInterpreter
from tartarus.sandbox.sandbox import new_sandbox_id
from tartarus.templates.built import Template, get_template

PHASES = ("started", "agent_ready", "first_answer")


async def _fresh(template: Template, workdir: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    box = await start_container(template, new_sandbox_id(), workdir)
    try:
        assert box.agent is not None
        process = await box.agent.exec(["python3", "-c", "print(1)"])
        out = b"".join([e.data async for e in process.events() if isinstance(e, Output)])
        answered = time.perf_counter() - t0
        if out != b"1\n":
            raise RuntimeError(f"python3 -c 'print(1)' printed {out!r}")
        return {**box.timings, "first_answer": answered}
    finally:
        await box.destroy()


async def _golden(template: Template, workdir: Path, image: Path) -> tuple[BundleSpec, int]:
    """Checkpoint a sandbox whose warm interpreter has the template's modules imported; its spec and
    the interpreter's pid."""
    if template.preload is None:
        raise InvalidArgument(f"template {template.name!r} has no code interpreter to restore")
    box = await start_container(template, new_sandbox_id(), workdir)
    try:
        assert box.agent is not None
        interpreter = await CodeInterpreter.start(box.agent, template.preload)
        await box.checkpoint(image)
        return box.spec, interpreter.pid
    finally:
        await box.destroy()


async def _restored(
    spec: BundleSpec, pid: int, image: Path, workdir: Path, *, created_ahead: bool
) -> dict[str, float]:
    box = GvisorContainer(new_sandbox_id(), spec, workdir)
    if created_ahead:  # as a pool of spare containers would have it: not timed
        await box.create()
    t0 = time.perf_counter()
    await box.restore(image)
    try:
        assert box.agent is not None
        answer = await CodeInterpreter.adopt(box.agent, pid).run_code("1+1")
        answered = time.perf_counter() - t0
        if answer.result != "2":
            raise RuntimeError(f"run_code('1+1') answered {answer}")
        return {**box.timings, "first_answer": answered}
    finally:
        await box.destroy()


def _summary(samples: list[dict[str, float]]) -> dict[str, Any]:
    return {
        **summary_ms([s["first_answer"] for s in samples]),
        "phases_cumulative": {p: summary_ms([s[p] for s in samples]) for p in PHASES},
    }


async def bench_gvisor_start(
    template_name: str, samples: int, progress: Callable[[int], None]
) -> dict[str, Any]:
    template = get_template(template_name)
    template_tree(template)  # extracted once, before the clock: that is setup, not start
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-") as tmp:
        root = Path(tmp)
        fresh = []
        for i in range(samples):
            fresh.append(await _fresh(template, root / f"fresh-{i}"))
            progress(1)
        image = root / "image"
        spec, pid = await _golden(template, root / "golden", image)
        image_bytes = sum(f.stat().st_size for f in image.rglob("*") if f.is_file())
        restored, ahead = [], []
        for i in range(samples):  # alternated, so both see the same machine
            restored.append(await _restored(spec, pid, image, root / f"restored-{i}", created_ahead=False))
            ahead.append(await _restored(spec, pid, image, root / f"ahead-{i}", created_ahead=True))
            progress(1)
    return {
        **_summary(restored),
        "created_ahead": _summary(ahead),
        "fresh": _summary(fresh),
        "image_bytes": image_bytes,
        "template": template_name,
        "backend": "gvisor",
        "what": "restore a checkpointed gVisor sandbox → run_code('1+1') answered by its warm interpreter "
        "(top level; "
        "created_ahead: into a container runsc created beforehand, as a pool would); "
        "fresh: start one without a checkpoint → python3 -c 'print(1)' answered",
    }
