"""What sandboxes leave on the host, for the leak check every test gets (tests/conftest.py).

Read from /proc, /run and /sys directly, so a check costs a few milliseconds: QEMU and gVisor processes,
network namespaces `tartarus-*` (and `ttn-*`, the cluster tests' agents' own), uplinks `trt*`, tartarus
cgroups (v1 controllers or v2), and the sandbox directories of the in-process daemons the fixtures run.
Only what lives under the session's base temporary directory counts (other processes' sandboxes on the
host are not this suite's). Each trace names the sandbox it belongs to where it can, so that VMMs a pool
pre-starts in the background (a test took one; the refill runs after it) are not counted as the test's
leak: pools are watched (`track_pools`) to know their sandboxes.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tartarus.limits.cgroups import GROUP, ROOT, V1_CONTROLLERS
from tartarus.network.netns import NETNS_DIR, NETNS_PREFIX, OWNERS_DIR, SLOTS_DIR
from tartarus.network.nft import HOST_PREFIX

SANDBOX_ID = re.compile(r"sb-[0-9a-f]{12}")
TEST_NETNS_PREFIX = "ttn-"  # the namespaces the cluster tests run agents in (tests/cluster/roles.py)


@dataclass(frozen=True)
class Trace:
    kind: str  # qemu, runsc, netns, uplink, cgroup, sandbox-dir
    name: str  # pid, namespace, link, cgroup path or directory
    sandbox: str | None  # the sandbox id it belongs to, when it names one


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _sandbox_in(text: str) -> str | None:
    found = SANDBOX_ID.findall(text)
    return found[-1] if found else None


def _foreign(netns: str, base: str) -> bool:
    """The namespace's sandbox directory is known and not this session's."""
    owner = _read(OWNERS_DIR / netns).strip()
    return bool(owner) and not owner.startswith(base)


def qemu_traces(base: str) -> set[Trace]:
    out = set()
    for pid in _listdir(Path("/proc")):
        if pid.isdigit() and _read(Path(f"/proc/{pid}/comm")).startswith("qemu-system"):
            cmdline = _read(Path(f"/proc/{pid}/cmdline"))
            if base in cmdline:
                out.add(Trace("qemu", pid, _sandbox_in(cmdline)))
    return out


# argv[0] of gVisor's host processes: runsc's sandbox and gofer, and the keeper of a container's channel.
RUNSC_ARGV0 = ("runsc-", "tartarus-channel:")


def runsc_traces(base: str) -> set[Trace]:
    """gVisor's host processes (sandbox, gofer: argv[0] `runsc-…`; the channel keeper) of a container
    under `base`."""
    out = set()
    for pid in _listdir(Path("/proc")):
        if pid.isdigit():
            cmdline = _read(Path(f"/proc/{pid}/cmdline"))
            if cmdline.startswith(RUNSC_ARGV0) and base in cmdline:
                out.add(Trace("runsc", pid, _sandbox_in(cmdline)))
    return out


def network_traces(base: str) -> set[Trace]:
    out = set()
    for netns in _listdir(NETNS_DIR):
        if netns.startswith(NETNS_PREFIX) and not _foreign(netns, base):
            out.add(Trace("netns", netns, _sandbox_in(netns)))
        elif netns.startswith(TEST_NETNS_PREFIX):
            out.add(Trace("netns", netns, None))
    for link in _listdir(Path("/sys/class/net")):
        if link.startswith(HOST_PREFIX) and link[len(HOST_PREFIX) :].isdigit():
            netns = _read(SLOTS_DIR / link[len(HOST_PREFIX) :]).strip()
            if not _foreign(netns, base):
                out.add(Trace("uplink", link, _sandbox_in(netns)))
    return out


def cgroup_traces(base: str) -> set[Trace]:
    groups = [ROOT / GROUP] + [ROOT / c / GROUP for c in V1_CONTROLLERS]
    return {
        Trace("cgroup", str(g / name), _sandbox_in(name))
        for g in groups
        for name in _listdir(g)
        if (g / name).is_dir() and not _foreign(NETNS_PREFIX + name, base)
    }


def traces(base: Path, sandbox_dirs: Iterable[Path] = ()) -> set[Trace]:
    """What this session's sandboxes (those under `base`) hold on the host now; `sandbox_dirs`: daemons'
    `sandboxes/` directories, whose entries are sandboxes (hibernated ones too) a daemon still has."""
    prefix = str(base.resolve())
    found = qemu_traces(prefix) | runsc_traces(prefix) | network_traces(prefix) | cgroup_traces(prefix)
    for root in sandbox_dirs:
        found |= {Trace("sandbox-dir", str(root / n), n) for n in _listdir(root) if SANDBOX_ID.fullmatch(n)}
    return found


# ---- pools ------------------------------------------------------------------------------------------

pooled: set[str] = set()  # ids of sandboxes a pool prepared and nobody has taken yet


def track_pools() -> None:
    """Learn which sandboxes are a pool's spares: wrap the pool's `_spare` (the id is chosen before
    anything exists on the host) and `take` (a taken spare becomes an ordinary sandbox)."""
    from tartarus.sandbox.sandbox import Sandbox, new_sandbox_id
    from tartarus.snapshots import pool, ready

    spare = pool.VMMPool._spare
    if getattr(spare, "tracked", False):
        return
    take = pool.VMMPool.take

    async def tracked_spare(self: pool.VMMPool, sandbox_id: str | None = None) -> Sandbox:
        sandbox_id = sandbox_id or new_sandbox_id()
        pooled.add(sandbox_id)
        return await spare(self, sandbox_id)

    def tracked_take(self: pool.VMMPool) -> Sandbox | None:
        sandbox = take(self)
        if sandbox is not None:
            pooled.discard(sandbox.id)
        return sandbox

    tracked_spare.tracked = True  # type: ignore[attr-defined]
    pool.VMMPool._spare = tracked_spare  # type: ignore[method-assign]
    pool.VMMPool.take = tracked_take  # type: ignore[method-assign]

    # The ready pools' sandboxes (`snapshots.ready`) the same way.
    warm, take_ready = ready.ReadyPool._warm, ready.WarmPool.take

    async def tracked_warm(self: ready.ReadyPool, sandbox_id: str | None = None) -> Sandbox:
        sandbox_id = sandbox_id or new_sandbox_id()
        pooled.add(sandbox_id)
        return await warm(self, sandbox_id)

    def tracked_take_ready(self: ready.WarmPool) -> Sandbox | None:
        sandbox = take_ready(self)
        if sandbox is not None:
            pooled.discard(sandbox.id)
        return sandbox

    ready.ReadyPool._warm = tracked_warm  # type: ignore[method-assign]
    ready.WarmPool.take = tracked_take_ready  # type: ignore[method-assign]

    # The created-ahead gVisor containers (`snapshots.gvisor_pool`) the same way.
    from tartarus.snapshots import gvisor_pool

    spare_gvisor, take_gvisor = gvisor_pool.GvisorPool._spare, gvisor_pool.GvisorPool.take

    async def tracked_spare_gvisor(self: gvisor_pool.GvisorPool, sandbox_id: str | None = None) -> Sandbox:
        sandbox_id = sandbox_id or new_sandbox_id()
        pooled.add(sandbox_id)
        return await spare_gvisor(self, sandbox_id)

    def tracked_take_gvisor(self: gvisor_pool.GvisorPool) -> Sandbox | None:
        sandbox = take_gvisor(self)
        if sandbox is not None:
            pooled.discard(sandbox.id)
        return sandbox

    warm_gvisor = gvisor_pool.GvisorReadyPool._warm

    async def tracked_warm_gvisor(
        self: gvisor_pool.GvisorReadyPool, sandbox_id: str | None = None
    ) -> Sandbox:
        sandbox_id = sandbox_id or new_sandbox_id()
        pooled.add(sandbox_id)
        return await warm_gvisor(self, sandbox_id)

    gvisor_pool.GvisorReadyPool._warm = tracked_warm_gvisor  # type: ignore[method-assign]
    gvisor_pool.GvisorPool._spare = tracked_spare_gvisor  # type: ignore[method-assign]
    gvisor_pool.GvisorPool.take = tracked_take_gvisor  # type: ignore[method-assign]


# ---- the check --------------------------------------------------------------------------------------


def new_traces(before: set[Trace], base: Path, sandbox_dirs: Iterable[Path]) -> set[Trace]:
    """Traces that appeared since `before` and are no pool's spare. A teardown still in progress (a
    sandbox whose record went first, its VMM a moment later) is given time to finish (15 s, or
    TARTARUS_TEST_LEAK_SETTLE_S)."""
    dirs = list(sandbox_dirs)
    deadline = time.monotonic() + float(os.environ.get("TARTARUS_TEST_LEAK_SETTLE_S", "15"))
    while True:
        leaked = {t for t in traces(base, dirs) - before if t.sandbox not in pooled}
        if not leaked or time.monotonic() > deadline:
            return leaked
        time.sleep(0.1)


def reap(leaked: set[Trace], daemon_urls: Iterable[str]) -> None:
    """Remove what a test left: through the daemons that may still hold it, then by hand (its VMM, its
    namespace, uplink and cgroups, its directory)."""
    from tartarus.errors import TartarusError
    from tartarus.limits.cgroups import reap as reap_cgroup
    from tartarus.network import sandbox as network
    from tartarus.sandbox.reap import reap_workdir
    from tartarus.sdk import Client

    ids = {t.sandbox for t in leaked if t.sandbox}
    for url in daemon_urls:
        with Client(url) as client:
            for sandbox_id in ids:
                with contextlib.suppress(TartarusError):
                    client.request("DELETE", f"/v1/sandboxes/{sandbox_id}")
    for trace in leaked:
        if trace.kind == "qemu":
            cmdline = _read(Path(f"/proc/{trace.name}/cmdline"))
            with contextlib.suppress(ProcessLookupError):
                if _read(Path(f"/proc/{trace.name}/comm")).startswith("qemu-system"):
                    os.kill(int(trace.name), 9)
            workdir = re.search(r"(/[^\0]*/" + (trace.sandbox or "-") + r")/", cmdline)
            if workdir:
                reap_workdir(Path(workdir.group(1)))
        elif trace.kind == "runsc":
            with contextlib.suppress(ProcessLookupError):
                if _read(Path(f"/proc/{trace.name}/cmdline")).startswith(RUNSC_ARGV0):
                    os.kill(int(trace.name), 9)
        elif trace.kind == "sandbox-dir":
            reap_workdir(Path(trace.name))
    for trace in traces(Path("/"), ()) & leaked:  # what the sandbox's directory no longer recorded
        if trace.kind == "netns":
            network._remove(trace.name, network._slot_of(trace.name))
        elif trace.kind == "cgroup" and trace.sandbox:
            reap_cgroup(trace.sandbox)
