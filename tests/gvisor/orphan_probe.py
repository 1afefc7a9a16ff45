"""Run as a script by tests/gvisor/test_reap.py and test_containment.py: creates a gVisor container (not
started, as a pool's spare is) in the directory given, says so, and dies by SIGKILL like a daemon killed
with -9. With `--contained` the container gets a network and a cgroup first, as a sandbox's does: the
network's record in the directory, the container in its `gvisor/`."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from tartarus.gvisor.container import GvisorContainer, agent_binary
from tartarus.gvisor.containment import GVISOR
from tartarus.gvisor.rootfs import template_tree
from tartarus.gvisor.spec import BundleSpec
from tartarus.limits.cgroups import SandboxCgroup
from tartarus.limits.spec import template_limits
from tartarus.network.sandbox import SandboxNetwork
from tartarus.sandbox.sandbox import new_sandbox_id
from tartarus.templates.built import get_template


async def main(workdir: Path, contained: bool) -> None:
    template = get_template("python-ds")
    spec = BundleSpec(rootfs=template_tree(template), agent=agent_binary(), hostname="orphan")
    id_ = new_sandbox_id()
    if contained:
        workdir.mkdir()
        network = SandboxNetwork.create(workdir, id_, nic="veth")
        cgroup = SandboxCgroup.create(id_, template_limits(template), GVISOR)
        box = GvisorContainer(id_, spec, workdir / "gvisor", network=network, cgroup=cgroup)
    else:
        box = GvisorContainer(id_, spec, workdir)
    await box.create()
    print("created", *([id_] if contained else []), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), "--contained" in sys.argv[2:]))
