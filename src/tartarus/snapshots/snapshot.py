"""A template snapshot on disk: `<cache>/snapshots/<key>/{memory, state, layer.ext4, snapshot.json}`.

`memory` is the guest RAM file (restores map it MAP_PRIVATE, so one file backs many sandboxes and each
pays only for the pages it dirties), `state` the device state (tens of KB), `layer.ext4` the writable
layer as it was when the guest stopped (each restore gets a sparse copy).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from tartarus.bootfiles.cache import digest
from tartarus.bootfiles.initramfs import initramfs_key
from tartarus.bootfiles.kernel import kernel_key, kernel_path
from tartarus.paths import cache_dir
from tartarus.runtime.accel import choose_accel
from tartarus.runtime.interpreter import GUEST_SCRIPT
from tartarus.templates.built import Template

SNAPSHOT_FORMAT = "qemu-x-ignore-shared-v1"


@dataclass(frozen=True)
class Snapshot:
    key: str
    path: Path
    template: str
    accel: str
    vcpus: int
    memory_mib: int
    interpreter_pid: int | None

    @property
    def memory(self) -> Path:
        return self.path / "memory"

    @property
    def state(self) -> Path:
        return self.path / "state"

    @property
    def layer(self) -> Path:
        return self.path / "layer.ext4"

    def write_meta(self, directory: Path) -> None:
        data = asdict(self)
        del data["path"]
        (directory / "snapshot.json").write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, path: Path) -> Snapshot:
        data = json.loads((path / "snapshot.json").read_text())
        return cls(path=path, **data)


@cache
def _qemu_version() -> str:
    return subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout


def _vm_shape(template: Template) -> str:
    """The QEMU command line a snapshot's VM has, with paths blanked: devices, CPU model, machine."""
    from tartarus.network.nft import TAP
    from tartarus.network.sandbox import GUEST_MAC
    from tartarus.runtime.qemu import Drive, VMConfig, command_line

    config = VMConfig(
        kernel=Path("K"),
        initrd=Path("I"),
        drives=[Drive(Path("B"), read_only=True), Drive(Path("L"), read_only=False)],
        accel=choose_accel(kernel_path()),
        vcpus=template.vcpus,
        memory_mib=template.memory_mib,
        memory_file=Path("M"),
        tap=TAP,  # the NIC is part of the saved device state
        guest_mac=GUEST_MAC,
    )
    return " ".join(command_line(config, qmp_fd=0, agent_fd=0)[1:])


_keys: dict[str, str] = {}


def snapshot_key(template: Template) -> str:
    """Everything the saved guest state depends on; change any of it and the snapshot is retaken."""
    key = _keys.get(template.key)
    if key is None:
        key = _keys[template.key] = _snapshot_key(template)
    return key


def _snapshot_key(template: Template) -> str:
    return digest(
        [
            SNAPSHOT_FORMAT,
            _vm_shape(template),
            template.key,
            kernel_key(),
            initramfs_key(),
            GUEST_SCRIPT.read_bytes(),
            choose_accel(kernel_path()),
            _qemu_version(),
        ]
    )


def snapshots_root() -> Path:
    return cache_dir() / "snapshots"


def find_snapshot(template: Template) -> Snapshot | None:
    path = snapshots_root() / snapshot_key(template)
    return Snapshot.load(path) if (path / "snapshot.json").exists() else None
