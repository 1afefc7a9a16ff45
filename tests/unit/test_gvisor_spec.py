"""The OCI spec of a gVisor sandbox: pure text from typed values (gvisor/spec.py)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from tartarus.errors import InvalidArgument
from tartarus.gvisor.spec import AGENT_PATH, SHELL, BundleSpec, config, config_json


def _spec(**overrides: object) -> BundleSpec:
    values: dict[str, object] = {
        "rootfs": Path("/cache/gvisor-trees/k/rootfs"),
        "agent": Path("/cache/initramfs/k/tartarus-agent"),
        "hostname": "sb-0123456789ab",
        "env": {"LANG": "C.UTF-8"},
        "workdir": "/root",
    }
    values.update(overrides)
    return BundleSpec(**values)  # type: ignore[arg-type]


def test_the_agent_is_the_shells_child_serving_its_stdin() -> None:
    # As PID 1 the agent would run as the VM's init (mount disks a container does not have).
    args = config(_spec())["process"]["args"]
    assert args[:2] == [SHELL, "-c"]
    first, _, rest = args[2].partition(";")
    assert shlex.split(first) == [AGENT_PATH, "--serve-fd", "0"]
    assert rest.strip() == "exit $?"  # not `exec`: the shell stays PID 1 and reaps orphans


def test_the_agent_binary_is_bind_mounted_read_only() -> None:
    mounts = {m["destination"]: m for m in config(_spec())["mounts"]}
    agent = mounts[AGENT_PATH]
    assert agent["source"] == "/cache/initramfs/k/tartarus-agent"
    assert agent["type"] == "bind" and "ro" in agent["options"]
    assert {"/proc", "/dev", "/sys"} <= set(mounts)


def test_the_shared_tree_is_the_root_written_only_through_the_overlay() -> None:
    root = config(_spec())["root"]
    assert root == {"path": "/cache/gvisor-trees/k/rootfs", "readonly": False}


def test_template_env_and_workdir_reach_the_process_with_a_default_path() -> None:
    process = config(_spec(env={"LANG": "C.UTF-8"}))["process"]
    assert process["cwd"] == "/root"
    assert "LANG=C.UTF-8" in process["env"]
    assert any(e.startswith("PATH=/usr/local/sbin:") for e in process["env"])
    overridden = config(_spec(env={"PATH": "/opt/bin"}))["process"]["env"]
    assert [e for e in overridden if e.startswith("PATH=")] == ["PATH=/opt/bin"]


def test_each_sandbox_has_its_own_namespaces_and_hostname() -> None:
    spec = config(_spec())
    assert spec["hostname"] == "sb-0123456789ab"
    kinds = {n["type"] for n in spec["linux"]["namespaces"]}
    assert {"pid", "network", "ipc", "uts", "mount"} <= kinds


def test_no_capability_that_administers_the_kernel() -> None:
    caps = config(_spec())["process"]["capabilities"]
    for kind in ("bounding", "effective", "permitted"):
        assert "CAP_SYS_ADMIN" not in caps[kind] and "CAP_SYS_PTRACE" not in caps[kind]
        assert "CAP_CHOWN" in caps[kind]


def test_config_json_is_that_spec() -> None:
    spec = _spec()
    assert json.loads(config_json(spec)) == config(spec)


@pytest.mark.parametrize(
    "overrides",
    [
        {"rootfs": Path("relative/rootfs")},
        {"agent": Path("agent")},
        {"workdir": "root"},
        {"env": {"A=B": "c"}},
        {"env": {"": "c"}},
        {"env": {"A": "nul\0"}},
    ],
)
def test_bad_input_is_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        _spec(**overrides)


def test_a_sandbox_with_network_runs_in_the_namespace_it_is_given() -> None:
    netns = Path("/run/netns/tartarus-sb-0123456789ab-nic")
    named = [n for n in config(_spec(), netns)["linux"]["namespaces"] if n["type"] == "network"]
    assert named == [{"type": "network", "path": str(netns)}]
    fresh = [n for n in config(_spec())["linux"]["namespaces"] if n["type"] == "network"]
    assert fresh == [{"type": "network"}]  # no network: a new, empty namespace (loopback only)
