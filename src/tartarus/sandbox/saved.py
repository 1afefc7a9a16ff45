"""Captured sandboxes on disk: hibernated sandboxes and checkpoints share one format.

`<dir>/image.json` (what it is and what it was captured from), `<dir>/memory.state` (device state plus
the guest pages the sandbox wrote) and `<dir>/layer.ext4` (its writable layer); a gVisor sandbox's is
`<dir>/gvisor/`, runsc's checkpoint image (memory, processes and its writable overlay in one). A saved
sandbox is written in a staging directory and published by one rename after everything in it is
fsynced, so a crash leaves either no saved sandbox or a whole one.

A saved sandbox is only meaningful over the template snapshot it was captured from, so it *pins* that
snapshot: hard links to its memory file and root filesystem under `<state>/pins/<snapshot key>/`. The
cache may then be cleaned or the template rebuilt without stranding a hibernated sandbox.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tartarus.gvisor.spec import BundleSpec
from tartarus.hibernation.capture import fsync_path
from tartarus.private import PRIVATE_DIR, PRIVATE_FILE, write_private
from tartarus.runtime.disks import sparse_copy
from tartarus.sandbox.spec import SandboxSpec
from tartarus.sealing import EnvSeal
from tartarus.snapshots.snapshot import Snapshot
from tartarus.templates.built import Template

META = "image.json"  # its name predates "saved sandbox"; kept so that earlier captures load
GVISOR_IMAGE = "gvisor"  # a gVisor capture's runsc image directory


@dataclass(frozen=True)
class SavedSandbox:
    path: Path
    kind: str  # "hibernation" | "checkpoint"
    id: str  # the sandbox id (hibernation) or the checkpoint id
    sandbox_id: str  # the sandbox it was captured from
    template: Template  # with rootfs pointing into the pin
    snapshot_key: str
    interpreter_pid: int | None
    vcpus: int  # as captured (the snapshot's)
    memory_mib: int
    spec: SandboxSpec  # how the sandbox was asked for (owner, env, network, limits): to admit it again
    created_at: float  # of the sandbox
    captured_at: float
    state_bytes: int
    layer_bytes: int  # allocated, not apparent: what the layer really costs on disk
    ttl_s: float | None = None  # checkpoints: deleted by gc this long after their last use
    exposed: Any = None  # the daemon's record of its exposed ports (`daemon.ports`), listened on again
    bundle: BundleSpec | None = None  # a gVisor capture: the container spec its image restores with

    @property
    def image(self) -> Path:
        """A gVisor capture's runsc image."""
        return self.path / GVISOR_IMAGE

    @property
    def state(self) -> Path:
        return self.path / "memory.state"

    @property
    def layer(self) -> Path:
        return self.path / "layer.ext4"

    @property
    def disk_bytes(self) -> int:
        return self.state_bytes + self.layer_bytes

    @property
    def env(self) -> Mapping[str, str]:
        return self.spec.env

    def to_json(self, seal: EnvSeal) -> str:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "path"}
        data["template"] = json.loads(self.template.to_json())
        data["bundle"] = self.bundle.to_json() if self.bundle is not None else None
        data["spec"] = {**self.spec.to_json(), "env": seal.seal(dict(self.env), self.sandbox_id)}
        return json.dumps(data, indent=2)

    @classmethod
    def load(cls, path: Path, seal: EnvSeal) -> SavedSandbox:
        data: dict[str, Any] = json.loads((path / META).read_text())
        tdata = data.pop("template")
        tdata["rootfs"] = Path(tdata["rootfs"])
        bundle = data.pop("bundle", None)
        data["bundle"] = BundleSpec.from_json(bundle) if bundle is not None else None
        if "spec" in data:
            spec = data.pop("spec")
            env = seal.open(spec["env"], data["sandbox_id"])
            data["spec"] = SandboxSpec.from_json({**spec, "env": env})
        else:  # version 1 (rev b43bebb and before): an untyped `request` and the env beside it
            env = seal.open(data.pop("env"), data["sandbox_id"])  # an older, plain env opens too
            request = data.pop("request", None) or {}
            data["exposed"] = request.get("exposed")
            data["spec"] = SandboxSpec.from_v1(tdata["name"], request, {"env": env})
        return cls(path=path, template=Template(**tdata), **data)


def allocated_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(allocated_bytes(child) for child in path.iterdir())
    return os.stat(path).st_blocks * 512


def publish(saved: SavedSandbox, final: Path, seal: EnvSeal) -> SavedSandbox:
    """Write the metadata, fsync the staging directory and rename it to `final`: the commit point."""
    staging = saved.path
    tmp = staging / (META + ".tmp")
    write_private(tmp, saved.to_json(seal))
    fsync_path(tmp)
    tmp.rename(staging / META)
    if saved.bundle is None:
        files = [staging / "memory.state", staging / "layer.ext4"]
    else:
        files = [*saved.image.iterdir(), saved.image]
    for path in files:
        fsync_path(path)
    fsync_path(staging)
    final.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    staging.rename(final)
    fsync_path(final.parent)
    return dataclasses.replace(saved, path=final)


def list_saved(root: Path, seal: EnvSeal) -> list[SavedSandbox]:
    """Saved sandboxes published under `root`; directories without metadata are crash leftovers."""
    if not root.exists():
        return []
    images = []
    for path in sorted(root.iterdir()):
        if (path / META).exists():
            images.append(SavedSandbox.load(path, seal))
    return images


def remove_saved(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another filesystem: a copy costs space but keeps the saved sandbox whole
        sparse_copy(src, tmp)
    # Template data, not a tenant's, but everything in the state dir is 0600. A link shares its inode with
    # the cache's file, which this makes 0600 too: harmless, the daemon's user owns it and its artefact
    # directory is 0700 already (bootfiles/cache.py makes them with mkdtemp).
    with contextlib.suppress(PermissionError):
        os.chmod(tmp, PRIVATE_FILE)
    tmp.rename(dst)


def pin(snapshot: Snapshot, template: Template, pins_root: Path) -> tuple[Snapshot, Template]:
    """The snapshot and template as seen through their pin (created if missing; idempotent)."""
    path = pins_root / snapshot.key
    pins_root.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    path.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    _link(snapshot.memory, path / "memory")
    _link(template.rootfs, path / "rootfs")
    if snapshot.state.exists():  # its RAM sections head a capture's device state (format 2)
        _link(snapshot.state, path / "state")
    if not (path / "snapshot.json").exists():
        snapshot.write_meta(path)
        os.chmod(path / "snapshot.json", PRIVATE_FILE)
    return Snapshot.load(path), dataclasses.replace(template, rootfs=path / "rootfs")


def pinned(pins_root: Path, key: str) -> Snapshot:
    return Snapshot.load(pins_root / key)


def unpin_unused(pins_root: Path, used: set[str]) -> list[str]:
    """Remove pins no saved sandbox refers to any more. Returns the keys removed."""
    removed = []
    if pins_root.exists():
        for path in pins_root.iterdir():
            if path.name not in used:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
    return removed
