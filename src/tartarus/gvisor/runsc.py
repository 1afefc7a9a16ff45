"""Find `runsc` and say whether it actually runs a container on this host.

Like the accelerator probe (runtime/accel.py), the verdict comes from running something, never from the
binary merely existing: runsc's platforms depend on the host (its `kvm` platform hangs under PVM), and a
runsc too old for the systrap platform fails at start, not at install.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tartarus.errors import SetupRequired

PLATFORM = "systrap"  # the platform that runs code at host speed without KVM
PROBE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Support:
    """Whether gVisor works here; `reason` says why not (or which runsc does)."""

    works: bool
    reason: str


def runsc_binary() -> Path:
    path = shutil.which("runsc")
    if path is None:
        raise SetupRequired("runsc is not installed: run ./scripts/setup (it installs it from backports)")
    return Path(path)


def runsc_version(binary: Path) -> str:
    """The first line of `runsc --version`, e.g. "runsc version 0.0~20240729.0"."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.splitlines()[0].strip() if out.stdout else "runsc (unknown version)"


def global_flags(state_root: Path, *, platform: str = PLATFORM, network: bool = False) -> list[str]:
    """Flags every runsc command of one sandbox shares: its state root, the platform, and the network:
    `sandbox` (gVisor's netstack on the interfaces of the sandbox's namespace, gvisor/containment.py)
    or `none` (loopback only). A checkpoint of a sandbox with network drops its open connections
    (`--net-disconnect-ok`), as a VM's peers time out on a hibernated guest's; without it runsc refuses
    to save while any TCP endpoint, even one in TIME_WAIT, is connected. Cgroups are the daemon's to
    make and fill, never runsc's."""
    net = ["--network=sandbox", "--net-disconnect-ok"] if network else ["--network=none"]
    return [f"--root={state_root}", f"--platform={platform}", *net, "--ignore-cgroups"]


def probe(timeout: float = PROBE_TIMEOUT_S, *, platform: str = PLATFORM) -> Support:
    """Run `/bin/true` in a throwaway gVisor sandbox (`runsc do`: the host's root, read-only, as its
    filesystem) and report whether it exited 0. A platform that hangs (kvm under PVM) is killed with
    its whole process group at the timeout, so the probe leaves no sandbox behind."""
    try:
        binary = runsc_binary()
    except SetupRequired as e:
        return Support(False, str(e))
    version = runsc_version(binary)
    with tempfile.TemporaryDirectory(prefix="tartarus-runsc-probe-") as tmp:
        argv = [str(binary), *global_flags(Path(tmp), platform=platform), "do", "/bin/true"]
        proc = subprocess.Popen(
            argv, cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
        )  # fmt: skip
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Support(
                False, f"{version} --platform={platform}: /bin/true did not exit in {timeout:.0f} s"
            )
    if proc.returncode != 0:
        why = (stderr.strip().splitlines() or ["no error output"])[-1]
        return Support(False, f"{version} --platform={platform}: {why}")
    return Support(True, f"{version}, platform {platform}")
