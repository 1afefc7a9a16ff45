"""How a contained gVisor sandbox's runsc is started (gvisor/containment.py, gvisor/runsc.py), and its
NIC's shape (network/sandbox.py): pure text, checked here without runsc or root."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tartarus.gvisor.containment import GVISOR, launch_prefix
from tartarus.gvisor.runsc import global_flags
from tartarus.limits.cgroups import VMM
from tartarus.limits.spec import Limits
from tartarus.network.sandbox import _nic


def test_nothing_to_contain_runs_runsc_as_it_is() -> None:
    assert launch_prefix() == []


def test_runsc_joins_every_cgroup_first_and_keeps_the_shells_pid(tmp_path: Path) -> None:
    """The shell writes its own pid to each `cgroup.procs` and then execs the command, which therefore
    has that pid: what the cgroup holds is runsc itself, so whatever it forks is born inside."""
    procs = [tmp_path / "cpu procs", tmp_path / "memory'procs"]  # quoting is the prefix's job
    argv = [*launch_prefix(cgroup_procs=procs), "sh", "-c", "echo $$"]
    pid = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    assert [p.read_text().strip() for p in procs] == [pid, pid]


def test_a_networked_runsc_sees_no_sysctl_net_in_a_mount_namespace_of_its_own() -> None:
    argv = launch_prefix(hide_sysctl_net=True)
    assert argv[:5] == ["unshare", "--mount", "--propagation", "private", "--"]
    script = argv[7]
    assert "mount -t tmpfs" in script and script.index("/proc/sys/net") < script.index('exec "$@"')


def test_runsc_flags_say_the_network_and_leave_cgroups_to_the_daemon() -> None:
    state = Path("/state")
    assert "--network=none" in global_flags(state) and "--ignore-cgroups" in global_flags(state)
    networked = global_flags(state, network=True)
    assert {"--network=sandbox", "--net-disconnect-ok", "--ignore-cgroups"} <= set(networked)
    assert "--network=none" not in networked


def test_the_nic_is_a_tap_for_a_vmm_and_a_veth_into_its_own_namespace_for_gvisor() -> None:
    assert _nic("tartarus-sb-1", "tap") == "tuntap add dev tap0 mode tap"
    veth = _nic("tartarus-sb-1", "veth")
    assert veth.startswith("link add tap0 type veth peer name eth0 ")
    assert veth.endswith(" netns tartarus-sb-1-nic")


def test_the_cgroup_ceilings_add_each_backends_own_overhead() -> None:
    limits = Limits(2, 512, 4096, None, None)
    assert (VMM.memory_limit_mib(limits), VMM.task_limit(limits)) == (512 + 320, 64 + 2)
    assert GVISOR.memory_limit_mib(limits) == 512 + GVISOR.memory_mib
    assert GVISOR.task_limit(limits) == GVISOR.tasks + 2 * GVISOR.tasks_per_vcpu
