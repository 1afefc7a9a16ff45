"""One request shape: a frozen SandboxSpec, its versioned JSON, and the records written before it
(descriptor version 1's `options` + `record`, image.json's `request`) still loading into it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tartarus.limits.spec import Limits
from tartarus.network.policy import NetworkPolicy
from tartarus.sandbox import descriptor
from tartarus.sandbox.saved import META, SavedSandbox
from tartarus.sandbox.spec import SandboxSpec
from tartarus.sealing import EnvSeal

ALLOW = {"mode": "allow", "allow": [{"host": "10.0.0.0/8", "ports": [443], "protocol": "tcp"}]}

# What rev b43bebb wrote in <workdir>/sandbox.json (version 1), env in clear as before sealing.
DESCRIPTOR_V1 = """{
  "version": 1, "id": "sb-0123456789ab", "template": "python-ds", "created_at": 1700000000.5,
  "options": {"vcpus": null, "memory_mib": null, "env": {"A": "b"}, "boot_timeout": 60.0,
              "network": {"mode": "allow",
                          "allow": [{"host": "10.0.0.0/8", "ports": [443], "protocol": "tcp"}]},
              "max_processes": 64, "disk_mib": 8192, "ttl_s": 300.0,
              "limits": {"vcpus": 1, "memory_mib": 512, "disk_mib": 8192, "max_processes": 64,
                         "ttl_s": 300.0},
              "outlive_owner": true},
  "vm": {"pid": 4242, "drive_nodes": {"1": "drive1"},
         "config": {"kernel": "/k/vmlinux", "initrd": "/k/initrd", "accel": "tcg", "vcpus": 1,
                    "memory_mib": 512, "kernel_args": ["tartarus.rw=/dev/vdb"],
                    "console_log": "/s/console.log", "memory_file": "/snap/memory",
                    "memory_share": false, "incoming": false, "tap": "tap0", "guest_mac": null,
                    "netns": "/run/netns/x", "cgroups": [], "user_net": false,
                    "outlive_owner": true,
                    "drives": [{"path": "/i/root", "read_only": true, "format": "raw"},
                               {"path": "/s/rw.ext4", "read_only": false, "format": "raw"}]}},
  "interpreter_pid": 77, "network": {"policy": {"mode": "allow", "rules": [], "hosts": []},
                                     "cut_off": false},
  "cgroup": "sb-0123456789ab",
  "quarantine": {"since": 5.0, "reason": "r", "by": "admission", "limits": null},
  "record": {"tenant": "acme", "labels": {"team": "ml"}, "idle_timeout": 30.0,
             "snapshot": "/pins/k", "exposed": {"8080": 41000}}
}"""

# What rev b43bebb wrote in a saved sandbox.json (a hibernation), with its untyped `request`.
IMAGE_V1 = {
    "kind": "hibernation",
    "id": "sb-0123456789ab",
    "sandbox_id": "sb-0123456789ab",
    "template": {"name": "python-ds", "key": "k1", "rootfs": "/pins/k/rootfs", "fstype": "ext4"},
    "snapshot_key": "k",
    "interpreter_pid": 7,
    "vcpus": 1,
    "memory_mib": 512,
    "env": {"A": "b"},
    "created_at": 1.0,
    "captured_at": 2.0,
    "state_bytes": 3,
    "layer_bytes": 4,
    "ttl_s": None,
    "request": {
        "tenant": "acme",
        "labels": {"team": "ml"},
        "network": ALLOW,
        "max_processes": 64,
        "disk_mib": 8192,
        "ttl_s": 300.0,
        "idle_timeout": 30.0,
        "exposed": {"8080": 41000},
    },
}

WANTED = SandboxSpec(
    "python-ds",
    env={"A": "b"},
    network=NetworkPolicy.model_validate(ALLOW),
    labels={"team": "ml"},
    tenant="acme",
    ttl_s=300.0,
    idle_timeout=30.0,
    disk_mib=8192,
    max_processes=64,
)


def test_a_spec_is_frozen_all_the_way_down() -> None:
    env = {"A": "b"}
    spec = SandboxSpec("python-ds", env=env, labels={"team": "ml"})
    env["A"] = "changed"  # the caller's dict is copied, not kept
    assert spec.env == {"A": "b"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.tenant = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.env["A"] = "x"  # type: ignore[index]
    with pytest.raises(TypeError):
        spec.labels["team"] = "x"  # type: ignore[index]
    derived = dataclasses.replace(spec, env={**spec.env, "B": "c"})
    assert derived.env == {"A": "b", "B": "c"} and spec.env == {"A": "b"}


def test_a_spec_round_trips_through_versioned_json() -> None:
    data = json.loads(json.dumps(WANTED.to_json()))
    assert data["version"] == 2
    assert SandboxSpec.from_json(data) == WANTED


def test_a_version_1_descriptor_still_loads(tmp_path: Path) -> None:
    workdir = tmp_path / "sb-0123456789ab"
    workdir.mkdir()
    (workdir / descriptor.DESCRIPTOR).write_text(DESCRIPTOR_V1)
    data = descriptor.read(workdir, EnvSeal.for_state_dir(tmp_path))
    assert data is not None
    found = descriptor.parse(data)
    assert found.spec == WANTED
    assert found.limits == Limits(1, 512, 8192, 64, 300.0)
    assert (found.snapshot, found.exposed) == (Path("/pins/k"), {"8080": 41000})
    assert (found.vmm_pid, found.interpreter_pid, found.cgroup) == (4242, 77, "sb-0123456789ab")
    assert found.quarantine is not None and found.quarantine.by == "admission"


def test_a_version_1_image_record_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "hibernated" / "sb-0123456789ab"
    path.mkdir(parents=True)
    (path / META).write_text(json.dumps(IMAGE_V1))
    saved = SavedSandbox.load(path, EnvSeal.for_state_dir(tmp_path))
    assert saved.spec == WANTED
    assert saved.exposed == {"8080": 41000}
    assert (saved.vcpus, saved.memory_mib, dict(saved.env)) == (1, 512, {"A": "b"})
    # Written again, it is version 2 and reads back the same.
    (path / META).write_text(saved.to_json(EnvSeal.for_state_dir(tmp_path)))
    assert json.loads((path / META).read_text())["spec"]["version"] == 2
    assert SavedSandbox.load(path, EnvSeal.for_state_dir(tmp_path)) == saved
