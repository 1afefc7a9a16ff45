"""`bench gvisor-start`: a fresh gVisor sandbox (no checkpoint yet) from spawn to its first answer.

Each sample starts a container of the template (runsc create + start, the agent's HELLO), runs
`python3 -c 'print(1)'` through the agent to its output, and destroys the container; the destroy is
not timed. The phases say where the time goes: runsc up, agent ready, the answer.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tartarus.bench.stats import summary_ms
from tartarus.gvisor.container import start_container
from tartarus.gvisor.rootfs import template_tree
from tartarus.runtime.agent import Output
from tartarus.runtime.sandbox import new_sandbox_id
from tartarus.templates.store import get_template

PHASES = ("started", "agent_ready", "first_answer")


async def bench_gvisor_start(
    template_name: str, samples: int, progress: Callable[[int], None]
) -> dict[str, Any]:
    template = get_template(template_name)
    template_tree(template)  # extracted once, before the clock: that is setup, not start
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-") as tmp:
        for i in range(samples):
            t0 = time.perf_counter()
            box = await start_container(template, new_sandbox_id(), Path(tmp) / str(i))
            try:
                assert box.agent is not None
                process = await box.agent.exec(["python3", "-c", "print(1)"])
                out = b"".join([e.data async for e in process.events() if isinstance(e, Output)])
                answered = time.perf_counter() - t0
                if out != b"1\n":
                    raise RuntimeError(f"python3 -c 'print(1)' printed {out!r}")
                for name in ("started", "agent_ready"):
                    phases[name].append(box.timings[name])
                phases["first_answer"].append(answered)
            finally:
                await box.destroy()
            progress(1)
    return {
        **summary_ms(phases["first_answer"]),
        "phases_cumulative": {name: summary_ms(values) for name, values in phases.items()},
        "template": template_name,
        "backend": "gvisor",
        "what": "start a gVisor sandbox (no checkpoint) → python3 -c 'print(1)' answered through the agent",
    }
