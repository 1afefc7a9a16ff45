"""A template's warm code interpreter, checkpointed once with `runsc checkpoint` and restored by every
gVisor create of the template (the gVisor counterpart of the VM snapshot).

The image lives in `<cache>/gvisor-warm/<key>/`, keyed by everything it is made of: the template's
tree, the agent binary, runsc's version, the container's spec and the modules imported. A restore
must use the spec the image was checkpointed with (same mounts, same hostname: gVisor does not let
the agent rename a restored sandbox), so the spec is part of what `warm_image` returns.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from tartarus import private
from tartarus.bootfiles.cache import cached, digest
from tartarus.errors import InvalidArgument
from tartarus.gvisor.container import GvisorContainer, agent_binary
from tartarus.gvisor.rootfs import template_tree, tree_key
from tartarus.gvisor.runsc import runsc_binary, runsc_version
from tartarus.gvisor.spec import BundleSpec, config_json
from tartarus.runtime.interpreter import CodeInterpreter
from tartarus.templates.built import Template

log = logging.getLogger(__name__)

LAYOUT = "gvisor-warm-v1"  # bump when what the image holds changes
META = "warm.json"
# Multithreaded BLAS is ~10x slower than one thread under systrap on a small host (its threads spin
# across gVisor's scheduler); every gVisor sandbox's processes get these unless they set their own.
BLAS_THREADS = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class WarmImage:
    """A checkpoint to restore: its directory, the spec it needs, the warm interpreter's pid in it."""

    path: Path
    spec: BundleSpec
    interpreter_pid: int


def sandbox_env(template: Template) -> dict[str, str]:
    """The environment a gVisor sandbox's processes start with: the BLAS cap, then the template's."""
    return {**BLAS_THREADS, **template.env}


def bundle_spec(template: Template) -> BundleSpec:
    """The container spec of every gVisor sandbox of `template` (named after the template: a restored
    sandbox keeps the hostname it was checkpointed with)."""
    return BundleSpec(
        rootfs=template_tree(template),
        agent=agent_binary(),
        hostname=template.name,
        env=sandbox_env(template),
        workdir=template.workdir,
    )


def image_key(template: Template, spec: BundleSpec) -> str:
    agent = hashlib.sha256(spec.agent.read_bytes()).hexdigest()
    preload = ",".join(template.preload or [])
    return digest(
        [LAYOUT, tree_key(template), agent, runsc_version(runsc_binary()), config_json(spec), preload]
    )


async def _build(template: Template, spec: BundleSpec, out: Path) -> None:
    """Start a container, start the warm interpreter in it, checkpoint it into `out/image`."""
    assert template.preload is not None
    box = GvisorContainer("warm-" + secrets.token_hex(6), spec, out / "golden")
    try:
        await box.start()
        assert box.agent is not None
        interpreter = await CodeInterpreter.start(box.agent, template.preload, env=dict(spec.env))
        await box.checkpoint(out / "image")
    finally:
        await box.destroy()
    private.write_private(out / META, json.dumps({"interpreter_pid": interpreter.pid}))


_found: dict[tuple[str, str], WarmImage] = {}


def warm_image(template: Template) -> WarmImage:
    """The template's warm image, built on first use (blocking for seconds: call it off the event
    loop; concurrent callers wait for one build)."""
    if template.preload is None:
        raise InvalidArgument(f"template {template.name!r} has no code interpreter to checkpoint")
    known = _found.get((template.name, template.key))
    if known is not None and known.path.is_dir():
        return known
    spec = bundle_spec(template)
    out = cached(
        "gvisor-warm", image_key(template, spec), lambda out: asyncio.run(_build(template, spec, out))
    )
    pid = int(json.loads((out / META).read_text())["interpreter_pid"])
    image = _found[(template.name, template.key)] = WarmImage(out / "image", spec, pid)
    log.info("gvisor warm image of %s: %s", template.name, out)
    return image
