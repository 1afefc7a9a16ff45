"""`bench gvisor-start`: a gVisor sandbox from spawn to its first answer, fresh and restored.

Fresh: each sample starts a container of the template (runsc create + start, the agent's HELLO) and
runs `python3 -c 'print(1)'` through the agent to its output. Restored: a golden sandbox with a Python
that has imported numpy and evaluates lines of stdin is checkpointed once; each sample restores it
under a new id (also into a container created beforehand, as a pool would keep them), adopts that
Python and has it evaluate `1+1`. Destroys are not timed. The phases say
where the time goes: runsc up, agent ready, the answer.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tartarus.bench.stats import summary_ms
from tartarus.gvisor.container import GvisorContainer, start_container
from tartarus.gvisor.rootfs import template_tree
from tartarus.gvisor.spec import BundleSpec
from tartarus.runtime.agent import INTERPRETER_ID, Output
from tartarus.runtime.sandbox import new_sandbox_id
from tartarus.templates.store import Template, get_template

PHASES = ("started", "agent_ready", "first_answer")
EVALUATOR = "import numpy, sys\nfor line in sys.stdin:\n    print(eval(line), flush=True)\n"


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
    """Checkpoint a sandbox whose evaluator has numpy loaded; its spec and the evaluator's pid."""
    box = await start_container(template, new_sandbox_id(), workdir)
    try:
        assert box.agent is not None
        evaluator = await box.agent.exec(
            ["python3", "-c", EVALUATOR],
            stdin=True,
            request_id=INTERPRETER_ID,
            env={"OPENBLAS_NUM_THREADS": "1"},
        )
        await evaluator.write_stdin(b"numpy.ones(2).sum()\n")
        if await evaluator.next_event() != Output("stdout", b"2.0\n"):
            raise RuntimeError("the evaluator did not answer before the checkpoint")
        await box.checkpoint(image)
        return box.spec, evaluator.pid
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
        evaluator = box.agent.adopt(INTERPRETER_ID, pid)
        await evaluator.write_stdin(b"1+1\n")
        answer = await evaluator.next_event()
        answered = time.perf_counter() - t0
        if answer != Output("stdout", b"2\n"):
            raise RuntimeError(f"the restored evaluator answered {answer}")
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
        "what": "restore a checkpointed gVisor sandbox → its numpy-loaded Python answers 1+1 (top level; "
        "created_ahead: into a container runsc created beforehand, as a pool would); "
        "fresh: start one without a checkpoint → python3 -c 'print(1)' answered",
    }
