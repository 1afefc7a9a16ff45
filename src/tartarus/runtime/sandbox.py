"""A sandbox: one microVM booted from a template, with its own writable layer and working directory.

Everything a sandbox owns on the host lives under its directory (`<state>/sandboxes/<id>/`), so destroying
it — or reconciling after a crash — is "kill the VMM whose pid file is there, then delete the directory".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tartarus.errors import InvalidArgument, SandboxFailed
from tartarus.guest.initramfs import initramfs_path
from tartarus.guest.kernel import kernel_path
from tartarus.limits import Limits, SandboxCgroup
from tartarus.limits.cgroups import reap as reap_cgroup
from tartarus.network import NetworkPolicy, SandboxNetwork
from tartarus.network import sandbox as network_records
from tartarus.network.nft import TAP
from tartarus.network.sandbox import GUEST_KERNEL_ARG, GUEST_MAC
from tartarus.private import PRIVATE_DIR
from tartarus.runtime.accel import choose_accel
from tartarus.runtime.agent import AgentClient
from tartarus.runtime.disks import create_layer
from tartarus.runtime.interpreter import CodeInterpreter
from tartarus.runtime.qemu import Drive, VMConfig, disk_node
from tartarus.runtime.vm import PID_FILE, MicroVM, is_our_vmm
from tartarus.templates.store import Template

if TYPE_CHECKING:
    from tartarus.quarantine.state import QuarantineState

log = logging.getLogger(__name__)

BOOT_TIMEOUT_S = 60.0
LAYER_DRIVE = 1  # vm_config's drives: the template's read-only root, then the sandbox's writable layer


def new_sandbox_id() -> str:
    return "sb-" + secrets.token_hex(6)


@dataclass
class SandboxOptions:
    vcpus: int | None = None
    memory_mib: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    boot_timeout: float = BOOT_TIMEOUT_S
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    max_processes: int | None = None  # requested; checked against the policy's caps by admission
    disk_mib: int | None = None  # requested writable-layer size; None: the template's layer as it is
    ttl_s: float | None = None  # requested lifetime
    limits: Limits | None = None  # resolved by admission (template + request, capped by policy)
    outlive_owner: bool = False  # set by a daemon that hands its sandboxes to the next (live restore)


class RuntimeSandbox:
    """The host-side runtime object for one sandbox (the daemon keeps one per live sandbox)."""

    def __init__(self, id_: str, template: Template, workdir: Path, options: SandboxOptions) -> None:
        self.id = id_
        self.template = template
        self.workdir = workdir
        self.options = options
        self.created_at = time.time()
        self.vm: MicroVM | None = None
        self.interpreter: CodeInterpreter | None = None
        self.timings: dict[str, float] = {}
        self.network: SandboxNetwork | None = None
        self.cgroup: SandboxCgroup | None = None
        self.quarantine: QuarantineState | None = None  # set by tartarus.quarantine, never by the guest

    @property
    def env(self) -> dict[str, str]:
        return {**self.template.env, **self.options.env}

    @property
    def agent(self) -> AgentClient:
        if self.vm is None or self.vm.agent is None:
            raise SandboxFailed(f"sandbox {self.id} is not running")
        if not self.vm.running:
            raise SandboxFailed(f"sandbox {self.id} has stopped: {self.vm.exit_message}")
        return self.vm.agent

    @classmethod
    async def boot(
        cls, template: Template, root: Path, options: SandboxOptions | None = None
    ) -> RuntimeSandbox:
        """Cold-boot a sandbox: fresh VM, kernel boot, agent ready. Cleans up everything on failure."""
        id_ = new_sandbox_id()
        workdir = root / id_
        workdir.mkdir(mode=PRIVATE_DIR, parents=True)
        sandbox = cls(id_, template, workdir, options or SandboxOptions())
        try:
            await sandbox._boot()
        except BaseException:
            await sandbox.destroy()
            raise
        return sandbox

    async def attach_network(self, name: str | None = None) -> None:
        """Give the sandbox its namespace, TAP and uplink (policy `none`) before its VMM starts.

        Runs on a thread (tens of ms of iproute2 that must not stall other sandboxes' creates); if
        the caller is cancelled meanwhile, it still waits for the thread so `destroy` can undo it."""
        task = asyncio.ensure_future(asyncio.to_thread(SandboxNetwork.create, self.workdir, name or self.id))
        try:
            self.network = await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                self.network = await task
            raise

    async def destroy_network(self) -> None:
        if self.network is not None:
            network, self.network = self.network, None
            await network.close_services()
            await asyncio.to_thread(network.destroy)

    def attach_cgroup(self) -> None:
        """Put the VMM (to be started, or already running) in cgroups sized by the sandbox's limits.
        A pooled VMM is already in a group made with its template's limits: only a resize, if any."""
        if self.options.limits is None:
            return
        if self.cgroup is not None:
            self.cgroup.resize(self.options.limits)
            return
        self.cgroup = SandboxCgroup.create(self.id, self.options.limits)
        if self.vm is not None and self.vm.pid is not None:
            self.cgroup.add(self.vm.pid)

    async def grow_disk(self, mib: int) -> None:
        """Grow the writable layer to `mib` MiB, live (never shrinks): QEMU grows the file and tells the
        guest, whose agent then grows the filesystem online."""
        vm = self.vm
        if vm is None:
            raise SandboxFailed(f"sandbox {self.id} is not running")
        size = mib << 20
        if vm.config.drives[LAYER_DRIVE].path.stat().st_size >= size:
            return
        await vm.qmp_execute("block_resize", {"node-name": disk_node(LAYER_DRIVE), "size": size})
        await self.agent.configure(disk_bytes=size)

    def vm_config(self, *, layer: Path, memory_file: Path | None = None, share: bool = True) -> VMConfig:
        """The VM's shape. A snapshot and its restores must agree on it device for device."""
        kernel = kernel_path()
        config = VMConfig(
            kernel=kernel,
            initrd=initramfs_path(),
            drives=[Drive(self.template.rootfs, read_only=True), Drive(layer, read_only=False)],
            accel=choose_accel(kernel),
            vcpus=self.options.vcpus or self.template.vcpus,
            memory_mib=self.options.memory_mib or self.template.memory_mib,
            kernel_args=[
                "tartarus.root=/dev/vda",
                f"tartarus.rootfstype={self.template.fstype}",
                "tartarus.rw=/dev/vdb",
                f"tartarus.hostname={self.id}",
            ],
            console_log=self.workdir / "console.log",
            memory_file=memory_file,
            memory_share=share,
        )
        if self.network is not None:
            config.tap = TAP
            config.guest_mac = GUEST_MAC
            config.netns = self.network.netns_path
            config.kernel_args.append(GUEST_KERNEL_ARG)
        if self.cgroup is not None:
            config.cgroups = self.cgroup.paths
        config.outlive_owner = self.options.outlive_owner
        return config

    async def _boot(self) -> None:
        t0 = time.perf_counter()
        await self.attach_network()
        self.attach_cgroup()
        layer = create_layer(self.workdir / "rw.ext4")
        self.vm = MicroVM(self.vm_config(layer=layer), self.workdir)
        await self.vm.start()
        self.timings["vmm_ready"] = self.vm.timings["vmm_ready"]
        await self.vm.wait_agent(self.options.boot_timeout)
        self.timings["agent_ready"] = time.perf_counter() - t0

    async def code_interpreter(self) -> CodeInterpreter:
        """The warm interpreter (adopted from the snapshot), or one started now on a cold-booted VM."""
        if self.interpreter is None:
            if self.template.preload is None:
                raise InvalidArgument(f"template {self.template.name!r} has no code interpreter")
            self.interpreter = await CodeInterpreter.start(self.agent, self.template.preload)
        return self.interpreter

    async def detach(self) -> None:
        """Let go of a sandbox that keeps running (a daemon stopping for the next one to take it over):
        what the daemon serves into it stops; the VM, its namespace and its cgroup stay."""
        if self.network is not None:
            await self.network.release()
        if self.vm is not None:
            await self.vm.detach()

    async def destroy(self) -> None:
        """Kill the VM and wipe everything the sandbox wrote ("Lethe"). Idempotent."""
        if self.vm is not None:
            await self.vm.kill()
        await self.destroy_network()
        cgroup, self.cgroup = self.cgroup, None
        # On a thread: the kernel refuses to remove the cgroup (EBUSY) until the dead VMM's memory is torn
        # down, which the removal waits for (tens of ms for a large guest), and the files are GBs sparse.
        await asyncio.to_thread(_remove_leftovers, cgroup, self.workdir)


def _remove_leftovers(cgroup: SandboxCgroup | None, workdir: Path) -> None:
    if cgroup is not None:
        cgroup.destroy()
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(workdir)


def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    """A SIGKILLed VMM still holds its TAP and cgroup until the kernel has finished with it."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state == "Z":  # a zombie holds nothing; its parent (the dead daemon) is gone or will reap it
            return
        time.sleep(0.01)


def reap_leftovers(root: Path, keep: Collection[Path] = ()) -> list[str]:
    """Clean what a previous daemon left under `root` (bar the directories in `keep`, sandboxes to be
    taken over): kill VMMs still recorded there, delete dirs.

    Returns the ids cleaned. Only processes that are QEMU *and* reference this sandbox's directory are
    killed, so a recycled pid never hits an unrelated process.
    """
    cleaned: list[str] = []
    if not root.exists():
        return cleaned
    for workdir in sorted(root.iterdir()):
        if workdir.is_dir() and workdir not in keep:
            reap_workdir(workdir)
            cleaned.append(workdir.name)
    return cleaned


def reap_workdir(workdir: Path) -> None:
    """Everything one sandbox directory stands for: its VMM, network namespace, cgroups, files."""
    pid_file = workdir / PID_FILE
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text())
        if is_our_vmm(pid, workdir):
            os.kill(pid, 9)
            log.warning("killed leftover VMM pid %d of %s", pid, workdir.name)
            _wait_gone(pid)
    network_records.reap(workdir)
    reap_cgroup(workdir.name)
    shutil.rmtree(workdir, ignore_errors=True)
