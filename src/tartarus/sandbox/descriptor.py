"""A running sandbox written down (`<workdir>/sandbox.json`), so that a restarted daemon can take it over.

A daemon's VMMs outlive it (`VMConfig.outlive_owner`). What the next daemon needs to
reconnect is what only the dead daemon knew: the VM's shape and pid, the network namespace and its
egress policy, the cgroup, the quarantine, the warm interpreter's pid, the sandbox's spec and limits,
and what the daemon keeps beside them (the snapshot under it, its exposed ports). A gVisor sandbox is
described by its runsc sandbox's pid and its container spec (`gvisor` instead of `vm`); its agent's
channel is found through its keeper (`tartarus.gvisor.container`). Written atomically
whenever one of those changes; a directory without a descriptor is a VMM no sandbox owned yet (a pooled
one, a create in progress) and is reaped. Version 1 (`options` and `record`) still loads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tartarus.errors import SandboxFailed
from tartarus.gvisor.container import GvisorContainer, pids_under
from tartarus.gvisor.leftovers import CONTAINER_DIR
from tartarus.gvisor.spec import BundleSpec
from tartarus.limits.cgroups import SandboxCgroup
from tartarus.limits.spec import Limits
from tartarus.network.policy import PinnedPolicy, PinnedRule
from tartarus.network.sandbox import SandboxNetwork
from tartarus.private import write_private
from tartarus.runtime.interpreter import CodeInterpreter
from tartarus.runtime.qemu import Drive, VMConfig
from tartarus.runtime.vm import MicroVM, is_our_vmm
from tartarus.sandbox.quarantine import QuarantineState
from tartarus.sandbox.spec import SandboxSpec
from tartarus.sealing import EnvSeal, SealError
from tartarus.templates.built import Template

log = logging.getLogger(__name__)

DESCRIPTOR = "sandbox.json"
VERSION = 2
READS = (1, 2)
_PATHS = ("kernel", "initrd", "console_log", "memory_file", "netns")


class Describable(Protocol):
    """What a descriptor records of a running sandbox (`tartarus.sandbox.sandbox.Sandbox`)."""

    id: str
    workdir: Path
    created_at: float
    spec: SandboxSpec
    limits: Limits | None
    vm: MicroVM | None
    container: GvisorContainer | None
    interpreter: CodeInterpreter | None
    network: SandboxNetwork | None
    cgroup: SandboxCgroup | None
    quarantined: QuarantineState | None
    template: Template


@dataclass(frozen=True)
class Described:
    """A descriptor, parsed: what `Sandbox.attach` reconnects to, and the daemon's part beside it."""

    id: str
    template: str
    created_at: float
    spec: SandboxSpec
    limits: Limits | None
    vmm_pid: int  # a gVisor sandbox's: runsc's sandbox process
    vm_config: VMConfig | None  # None: a gVisor sandbox, whose container spec is `gvisor`
    drive_nodes: dict[int, str]
    interpreter_pid: int | None
    network: PinnedPolicy | None
    cut_off: bool
    cgroup: str | None
    quarantine: QuarantineState | None
    snapshot: Path | None  # the template snapshot it was restored from (None: booted)
    exposed: Any  # the daemon's record of its exposed ports (`daemon.ports`)
    gvisor: BundleSpec | None = None


def write(sandbox: Describable, seal: EnvSeal, *, snapshot: Path | None = None, exposed: Any = None) -> None:
    """Describe `sandbox` (running) in its directory. Its env is sealed (`tartarus.sealing`): the
    descriptor is on disk as long as the sandbox runs."""
    vm, container = sandbox.vm, sandbox.container
    if container is not None and container.pid is not None:
        engine: dict[str, Any] = {"gvisor": {"pid": container.pid, "spec": container.spec.to_json()}}
    elif vm is not None and vm.pid is not None:
        engine = {
            "vm": {
                "pid": vm.pid,
                "config": dataclasses.asdict(vm.config),
                "drive_nodes": {str(k): v for k, v in vm.drive_nodes.items()},
            }
        }
    else:
        raise SandboxFailed(f"sandbox {sandbox.id} has no VMM or container to describe")
    network = sandbox.network
    data = {
        "version": VERSION,
        "id": sandbox.id,
        "template": sandbox.template.name,
        "created_at": sandbox.created_at,
        "spec": {**sandbox.spec.to_json(), "env": seal.seal(dict(sandbox.spec.env), sandbox.id)},
        "limits": dataclasses.asdict(sandbox.limits) if sandbox.limits else None,
        **engine,
        "interpreter_pid": sandbox.interpreter.pid if sandbox.interpreter else None,
        "network": None
        if network is None
        else {
            "policy": dataclasses.asdict(network.policy),
            "cut_off": network.cut_off,
        },
        "cgroup": sandbox.cgroup.name if sandbox.cgroup else None,
        "quarantine": dataclasses.asdict(sandbox.quarantined) if sandbox.quarantined else None,
        "snapshot": str(snapshot) if snapshot else None,
        "exposed": exposed,
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
        if not isinstance(data, dict) or data.get("version") not in READS:
            return None
        part = data["options"] if data["version"] == 1 else data["spec"]
        part["env"] = seal.open(part["env"], str(data["id"]))
    except SealError as e:
        log.error("%s: %s", workdir / DESCRIPTOR, e)
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data


def vmm_pid(data: Mapping[str, Any]) -> int:
    return int((data.get("gvisor") or data["vm"])["pid"])


def still_runs(data: Mapping[str, Any], workdir: Path) -> bool:
    """The described VMM (QEMU referencing `workdir`) or runsc sandbox (of `workdir`'s container) runs.
    Raises KeyError, TypeError or ValueError if the descriptor is damaged."""
    pid = vmm_pid(data)
    if data.get("gvisor") is not None:
        return pid in pids_under(workdir / CONTAINER_DIR / "runsc")
    return is_our_vmm(pid, workdir)


def parse(data: Mapping[str, Any]) -> Described:
    """A descriptor `read` returned, typed. Raises KeyError, TypeError or ValueError if it is damaged."""
    template = str(data["template"])
    if data["version"] == 1:
        options, record = data["options"], data.get("record") or {}
        spec = SandboxSpec.from_v1(template, record, options)
        limits = _load_limits(options.get("limits"))
        snapshot, exposed = record.get("snapshot"), record.get("exposed")
    else:
        spec = SandboxSpec.from_json(data["spec"])
        limits = _load_limits(data.get("limits"))
        snapshot, exposed = data.get("snapshot"), data.get("exposed")
    net = data.get("network")
    q = data.get("quarantine")
    gvisor = data.get("gvisor")
    vm_data = data["vm"] if gvisor is None else None
    return Described(
        id=str(data["id"]),
        template=template,
        created_at=float(data["created_at"]),
        spec=spec,
        limits=limits,
        vmm_pid=vmm_pid(data),
        vm_config=_load_config(vm_data["config"]) if vm_data is not None else None,
        drive_nodes={int(k): str(v) for k, v in (vm_data or {}).get("drive_nodes", {}).items()},
        interpreter_pid=int(data["interpreter_pid"]) if data.get("interpreter_pid") is not None else None,
        network=_load_policy(net["policy"]) if net is not None else None,
        cut_off=bool(net["cut_off"]) if net is not None else False,
        cgroup=str(data["cgroup"]) if data.get("cgroup") else None,
        quarantine=QuarantineState(
            float(q["since"]), str(q["reason"]), str(q["by"]), _load_limits(q.get("limits"))
        )
        if q
        else None,
        snapshot=Path(snapshot) if snapshot else None,
        exposed=exposed,
        gvisor=BundleSpec.from_json(gvisor["spec"]) if gvisor is not None else None,
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
