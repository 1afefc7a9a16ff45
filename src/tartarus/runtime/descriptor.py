"""A running sandbox written down (`<workdir>/sandbox.json`), so that a restarted daemon can take it over.

A daemon's VMMs outlive it (`VMConfig.outlive_owner`). What the next daemon needs to
reconnect is what only the dead daemon knew: the VM's shape and pid, the network namespace and its
egress policy, the cgroup, the quarantine, the warm interpreter's pid, and (under `record`) what the
daemon keeps about the sandbox. Written atomically whenever one of those changes; a directory without
a descriptor is a VMM no sandbox owned yet (a pooled one, a create in progress) and is reaped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from tartarus.errors import SandboxFailed
from tartarus.limits import SandboxCgroup
from tartarus.limits.spec import Limits
from tartarus.network import NetworkPolicy, SandboxNetwork
from tartarus.network.policy import PinnedPolicy, PinnedRule
from tartarus.private import write_private
from tartarus.quarantine.state import QuarantineState
from tartarus.runtime.interpreter import CodeInterpreter
from tartarus.runtime.qemu import Drive, VMConfig
from tartarus.runtime.sandbox import RuntimeSandbox, SandboxOptions
from tartarus.runtime.vm import MicroVM
from tartarus.sealing import EnvSeal, SealError
from tartarus.templates.store import Template

log = logging.getLogger(__name__)

DESCRIPTOR = "sandbox.json"
VERSION = 1
_PATHS = ("kernel", "initrd", "console_log", "memory_file", "netns")


def write(sandbox: RuntimeSandbox, record: dict[str, Any], seal: EnvSeal) -> None:
    """Describe `sandbox` (running) in its directory; `record` is the daemon's own part. Its env is
    sealed (`tartarus.sealing`): the descriptor is on disk as long as the sandbox runs."""
    vm = sandbox.vm
    if vm is None or vm.pid is None:
        raise SandboxFailed(f"sandbox {sandbox.id} has no VMM to describe")
    network = sandbox.network
    data = {
        "version": VERSION,
        "id": sandbox.id,
        "template": sandbox.template.name,
        "created_at": sandbox.created_at,
        "options": {**_options(sandbox.options), "env": seal.seal(sandbox.options.env, sandbox.id)},
        "vm": {
            "pid": vm.pid,
            "config": dataclasses.asdict(vm.config),
            "drive_nodes": {str(k): v for k, v in vm.drive_nodes.items()},
        },
        "interpreter_pid": sandbox.interpreter.pid if sandbox.interpreter else None,
        "network": None
        if network is None
        else {
            "policy": dataclasses.asdict(network.policy),
            "cut_off": network.cut_off,
        },
        "cgroup": sandbox.cgroup.name if sandbox.cgroup else None,
        "quarantine": dataclasses.asdict(sandbox.quarantine) if sandbox.quarantine else None,
        "record": record,
    }
    path = sandbox.workdir / DESCRIPTOR
    tmp = path.with_suffix(".tmp")
    write_private(tmp, json.dumps(data, default=str))
    os.replace(tmp, path)


def read(workdir: Path, seal: EnvSeal) -> dict[str, Any] | None:
    """The descriptor in `workdir` with its env opened, or None if there is none (or it is not one this
    version reads, or its env does not open with `seal`)."""
    try:
        data = json.loads((workdir / DESCRIPTOR).read_text())
        if not isinstance(data, dict) or data.get("version") != VERSION:
            return None
        data["options"]["env"] = seal.open(data["options"]["env"], str(data["id"]))
    except SealError as e:
        log.error("%s: %s", workdir / DESCRIPTOR, e)
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data


def vmm_pid(data: dict[str, Any]) -> int:
    return int(data["vm"]["pid"])


async def attach(data: dict[str, Any], template: Template, workdir: Path) -> RuntimeSandbox:
    """Reconnect to the sandbox `data` describes. On failure the caller reaps `workdir` (VMM, namespace,
    cgroup, files); what this process had opened for it (relay, connections) is closed here."""
    sandbox = RuntimeSandbox(str(data["id"]), template, workdir, _load_options(data["options"]))
    try:
        await _attach(sandbox, data, workdir)
    except BaseException:
        await sandbox.detach()
        raise
    return sandbox


async def _attach(sandbox: RuntimeSandbox, data: dict[str, Any], workdir: Path) -> None:
    sandbox.created_at = float(data["created_at"])
    net = data.get("network")
    if net is not None:
        sandbox.network = SandboxNetwork.existing(
            workdir, _load_policy(net["policy"]), cut_off=bool(net["cut_off"])
        )
        await sandbox.network.resume_services()
    if data.get("cgroup"):
        sandbox.cgroup = SandboxCgroup.existing(str(data["cgroup"]), sandbox.options.limits)
    if data.get("quarantine"):
        q = data["quarantine"]
        sandbox.quarantine = QuarantineState(
            float(q["since"]), str(q["reason"]), str(q["by"]), _load_limits(q.get("limits"))
        )
    vm_data = data["vm"]
    config = _load_config(vm_data["config"])
    nodes = {int(k): str(v) for k, v in vm_data.get("drive_nodes", {}).items()}
    sandbox.vm = await MicroVM.attach(config, workdir, vmm_pid(data), drive_nodes=nodes)
    if data.get("interpreter_pid") is not None:
        sandbox.interpreter = CodeInterpreter.reattach(
            sandbox.vm.agent_client(), int(data["interpreter_pid"])
        )


def _options(options: SandboxOptions) -> dict[str, Any]:
    return {
        "vcpus": options.vcpus,
        "memory_mib": options.memory_mib,
        "env": options.env,
        "boot_timeout": options.boot_timeout,
        "network": options.network.model_dump(mode="json"),
        "max_processes": options.max_processes,
        "disk_mib": options.disk_mib,
        "ttl_s": options.ttl_s,
        "limits": dataclasses.asdict(options.limits) if options.limits else None,
        "outlive_owner": options.outlive_owner,
    }


def _load_options(data: dict[str, Any]) -> SandboxOptions:
    return SandboxOptions(
        vcpus=data["vcpus"],
        memory_mib=data["memory_mib"],
        env=dict(data["env"]),
        boot_timeout=float(data["boot_timeout"]),
        network=NetworkPolicy.model_validate(data["network"]),
        max_processes=data["max_processes"],
        disk_mib=data.get("disk_mib"),
        ttl_s=data["ttl_s"],
        limits=_load_limits(data["limits"]),
        outlive_owner=bool(data.get("outlive_owner", True)),
    )


def _load_limits(data: dict[str, Any] | None) -> Limits | None:
    return Limits(**data) if data else None


def _load_policy(data: dict[str, Any]) -> PinnedPolicy:
    return PinnedPolicy(
        mode=str(data["mode"]),
        rules=tuple(
            PinnedRule(str(r["network"]), tuple(int(p) for p in r["ports"]), str(r["protocol"]))
            for r in data["rules"]
        ),
        hosts=tuple((str(name), str(addr)) for name, addr in data["hosts"]),
    )


def _load_config(data: dict[str, Any]) -> VMConfig:
    fields = dict(data)
    for name in _PATHS:
        if fields.get(name) is not None:
            fields[name] = Path(fields[name])
    fields["drives"] = [
        Drive(Path(d["path"]), bool(d["read_only"]), str(d["format"])) for d in data["drives"]
    ]
    fields["cgroups"] = [Path(p) for p in data["cgroups"]]
    return VMConfig(**fields)
