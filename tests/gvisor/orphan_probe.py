"""Run as a script by tests/gvisor/test_reap.py: creates a gVisor container (not started, as a pool's
spare is) in the directory given, says so, and dies by SIGKILL like a daemon killed with -9."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from tartarus.gvisor.container import GvisorContainer, agent_binary
from tartarus.gvisor.rootfs import template_tree
from tartarus.gvisor.spec import BundleSpec
from tartarus.sandbox.sandbox import new_sandbox_id
from tartarus.templates.built import get_template


async def main(workdir: Path) -> None:
    spec = BundleSpec(
        rootfs=template_tree(get_template("python-ds")), agent=agent_binary(), hostname="orphan"
    )
    box = GvisorContainer(new_sandbox_id(), spec, workdir)
    await box.create()
    print("created", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
