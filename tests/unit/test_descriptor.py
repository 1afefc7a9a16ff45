"""A running sandbox's descriptor survives the JSON round trip a restarted daemon reads it through."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tartarus.gvisor.container import GvisorContainer
from tartarus.gvisor.spec import BundleSpec
from tartarus.limits.spec import Limits
from tartarus.network import NetworkPolicy
from tartarus.network.policy import PinnedPolicy, PinnedRule
from tartarus.runtime.qemu import Drive, VMConfig
from tartarus.sandbox.descriptor import (
    _load_config,
    _load_limits,
    _load_policy,
    parse,
    read,
    still_runs,
    vmm_pid,
    write,
)
from tartarus.sandbox.spec import SandboxSpec
from tartarus.sealing import EnvSeal


def _through_json(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def test_vm_config_round_trips() -> None:
    config = VMConfig(
        kernel=Path("/k/vmlinux"),
        initrd=Path("/k/initrd"),
        drives=[Drive(Path("/i/root.erofs"), True, "raw"), Drive(Path("/s/rw.ext4"), False)],
        accel="tcg",
        vcpus=2,
        memory_mib=768,
        kernel_args=["tartarus.rw=/dev/vdb"],
        console_log=Path("/s/console.log"),
        memory_file=Path("/snap/memory"),
        memory_share=False,
        incoming=True,
        tap="tap0",
        netns=Path("/run/netns/tartarus-x"),
        cgroups=[Path("/sys/fs/cgroup/cpu/tartarus/x")],
    )
    assert _load_config(_through_json(dataclasses.asdict(config))) == config


def test_spec_and_limits_round_trip() -> None:
    options = SandboxSpec(
        "python-ds",
        vcpus=1,
        memory_mib=512,
        env={"A": "b"},
        network=NetworkPolicy.model_validate(
            {"mode": "allow", "allow": [{"host": "10.0.0.0/8", "ports": [443]}]}
        ),
        labels={"team": "ml"},
        tenant="acme",
        max_processes=64,
        ttl_s=30.0,
        idle_timeout=5.0,
    )
    limits = Limits(vcpus=1, memory_mib=512, disk_mib=4096, max_processes=64, ttl_s=30.0)
    assert SandboxSpec.from_json(_through_json(options.to_json())) == options
    assert SandboxSpec.from_json(_through_json(SandboxSpec("t").to_json())) == SandboxSpec("t")
    assert _load_limits(_through_json(dataclasses.asdict(limits))) == limits


def test_pinned_policy_round_trips() -> None:
    policy = PinnedPolicy(
        "allow", (PinnedRule("203.0.113.2/32", (80, 443), "tcp"),), (("example.test", "203.0.113.2"),)
    )
    assert _load_policy(_through_json(dataclasses.asdict(policy))) == policy


def test_a_gvisor_sandbox_is_described_by_its_runsc_pid_and_container_spec(tmp_path: Path) -> None:
    """What the next daemon reads to take a gVisor sandbox over (its channel is its keeper's)."""
    bundle = BundleSpec(Path("/trees/k/rootfs"), Path("/cache/agent"), "python-ds", {"A": "1"}, "/root")
    box = GvisorContainer("sb-1", bundle, tmp_path / "gvisor")
    box.pid = 4321
    sandbox = SimpleNamespace(
        id="sb-1", workdir=tmp_path, created_at=1.0, spec=SandboxSpec("python-ds", env={"K": "v"}),
        limits=None, vm=None, container=box, interpreter=None, network=None, cgroup=None,
        quarantined=None, template=SimpleNamespace(name="python-ds"),
    )  # fmt: skip
    seal = EnvSeal.for_state_dir(tmp_path)
    write(sandbox, seal)  # the fields `write` reads, nothing else
    data = read(tmp_path, seal)
    assert data is not None and vmm_pid(data) == 4321
    found = parse(data)
    assert found.gvisor == bundle and found.vm_config is None and found.vmm_pid == 4321
    assert found.spec.env == {"K": "v"}
    assert not still_runs(data, tmp_path)  # no runsc of that container runs
