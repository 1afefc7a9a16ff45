"""`tartarus setup`: build every artefact a sandbox needs, each cached by the hash of its inputs.

Re-running it when everything is built costs a few hashes and stats.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

from tartarus.bootfiles.initramfs import build_initramfs
from tartarus.bootfiles.kernel import build_kernel
from tartarus.runtime.accel import choose_accel
from tartarus.runtime.disks import empty_layer
from tartarus.runtime.launcher import build_launcher
from tartarus.runtime.ramfile import build_shim
from tartarus.templates.build import build_template
from tartarus.templates.spec import builtin_spec

Step = tuple[str, Callable[[], object]]


def steps(templates: list[str], log: Callable[[str], None]) -> list[Step]:
    out: list[Step] = [
        ("guest kernel (first build ~5 min)", build_kernel),
        ("guest agent initramfs", build_initramfs),
        ("VMM launcher", build_launcher),
        ("VMM read-only RAM shim", build_shim),
        ("empty writable layer", empty_layer),
        ("accelerator probe", lambda: log(f"accelerator: {choose_accel(build_kernel())}")),
    ]
    for name in templates:
        spec = builtin_spec(name)
        build = functools.partial(build_template, spec, log)
        out.append((f"template {name} (first build ~3-5 min)", build))
        if spec.interpreter is not None or spec.start is not None:
            out.append((f"snapshot of {name} (first time ~30 s)", functools.partial(_snapshot, name, log)))
        if spec.interpreter is not None and spec.start is None:
            out.append((f"gVisor warm image of {name}", functools.partial(_gvisor_image, name, log)))
    return out


def _gvisor_image(name: str, log: Callable[[str], None]) -> Path | None:
    """The template's `runsc checkpoint` for the gvisor backend, where gVisor works (else a note: the
    VM backends need none of it)."""
    from tartarus.gvisor.runsc import probe
    from tartarus.gvisor.warm import warm_image
    from tartarus.templates.built import get_template

    support = probe()
    if not support.works:
        log(f"  gvisor backend unavailable here: {support.reason}")
        return None
    return warm_image(get_template(name)).path


def _snapshot(name: str, log: Callable[[str], None]) -> Path:
    from tartarus.snapshots.build import ensure_snapshot
    from tartarus.templates.built import get_template

    return ensure_snapshot(get_template(name), log).path


def provision(templates: list[str], log: Callable[[str], None] = print) -> dict[str, float]:
    timings: dict[str, float] = {}
    for title, run in steps(templates, log):
        t0 = time.perf_counter()
        log(f"· {title}")
        result = run()
        timings[title] = time.perf_counter() - t0
        log(f"  {result if isinstance(result, Path) else 'done'}  ({timings[title]:.1f} s)")
    return timings
