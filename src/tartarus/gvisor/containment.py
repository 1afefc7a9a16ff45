"""How a contained gVisor sandbox's runsc commands are started: in its cgroups, and able to network.

Two things runsc cannot be told by a flag, so each command is started through `unshare` and a shell
that does them and then execs runsc (the same pid throughout):

- Limits: `runsc create` joins the sandbox's cgroups before it runs (`echo $$ > cgroup.procs`), so the
  sandbox, gofer and stub processes it forks are born inside them, as a VMM joins its own between fork
  and exec. runsc itself is told to leave cgroups alone (`--ignore-cgroups`): the daemon owns them.
- Network: runsc 20240729 refuses `--network=sandbox` when `/proc/sys/net/core/rmem_default` exists,
  its test for "this is the root network namespace"; since Linux 6.11 that file exists in every
  namespace (gVisor issue 10704). A private mount namespace with an empty tmpfs over `/proc/sys/net`
  hides it from runsc alone; the sandbox it starts is in the namespace the spec names, whatever it saw.

Pure text from paths, so it is unit-tested without runsc.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from tartarus.limits.cgroups import Overhead

SYSCTL_NET = "/proc/sys/net"
# A gVisor sandbox's host side beyond the guest's memory: the sentry (Go heap, page tables of the
# memory file), the gofer, runsc create while it runs. Tasks: the sentry's and gofer's Go threads
# (tens) plus systrap's stub threads, about one per guest thread.
GVISOR = Overhead(memory_mib=128, tasks=256, tasks_per_vcpu=64)


def launch_prefix(*, cgroup_procs: Sequence[Path] = (), hide_sysctl_net: bool = False) -> list[str]:
    """The argv to put before a runsc command line (empty: run it as it is)."""
    steps = [f"echo $$ > {shlex.quote(str(procs))}" for procs in cgroup_procs]
    if hide_sysctl_net:
        steps.append(f"mount -t tmpfs -o ro,size=4k tartarus-no-sysctl {SYSCTL_NET}")
    if not steps:
        return []
    script = "set -e; " + "; ".join(steps) + '; exec "$@"'
    shell = ["/bin/sh", "-c", script, "runsc"]
    if hide_sysctl_net:
        return ["unshare", "--mount", "--propagation", "private", "--", *shell]
    return shell
