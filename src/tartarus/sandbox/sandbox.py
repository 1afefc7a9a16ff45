"""A sandbox: one microVM (or one gVisor container: `start_gvisor`) from a template, with its own
writable layer and working directory, and one method per verb — `boot`, `prepare`/`restore`, `wake`,
`copy`, `hibernate`, `checkpoint`, `attach`, `detach`, `destroy`, `contain`, `quarantine`, `release`.
Only these methods set its fields.

Everything a sandbox owns on the host lives under its directory (`<state>/sandboxes/<id>/`), so destroying
it — or reconciling after a crash — is "kill the VMM whose pid file is there, then delete the directory"
(`tartarus.sandbox.reap`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import select
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tartarus import audit, failpoints
from tartarus.bootfiles.initramfs import initramfs_path
from tartarus.bootfiles.kernel import kernel_path
from tartarus.errors import Conflict, InvalidArgument, SandboxFailed
from tartarus.gvisor.container import GvisorContainer
from tartarus.gvisor.containment import GVISOR
from tartarus.gvisor.leftovers import CONTAINER_DIR
from tartarus.gvisor.spec import BundleSpec
from tartarus.gvisor.warm import WarmImage, bundle_spec, sandbox_env, warm_image
from tartarus.hibernation import image, lazy, reflink
from tartarus.hibernation.capture import fsync_path
from tartarus.hibernation.load import load
from tartarus.limits import Limits, SandboxCgroup
from tartarus.limits.bandwidth import Bandwidth
from tartarus.limits.cgroups import VMM, Overhead
from tartarus.limits.guest import set_max_processes
from tartarus.network import SandboxNetwork
from tartarus.network.guest import pin_names, use_relay
from tartarus.network.nft import TAP
from tartarus.network.sandbox import GATEWAY, GUEST_KERNEL_ARG, GUEST_MAC, NicKind
from tartarus.private import PRIVATE_DIR, PRIVATE_FILE
from tartarus.runtime.accel import choose_accel
from tartarus.runtime.agent import AgentClient
from tartarus.runtime.disks import create_layer, sparse_copy
from tartarus.runtime.interpreter import CodeInterpreter
from tartarus.runtime.qemu import Drive, VMConfig, disk_node
from tartarus.runtime.vm import MicroVM
from tartarus.sandbox import capture, descriptor, gvisor_capture
from tartarus.sandbox.backend import Backend, Engine
from tartarus.sandbox.capture import LAYER, RESUMED
from tartarus.sandbox.descriptor import Described
from tartarus.sandbox.layout import Layout
from tartarus.sandbox.quarantine import Confinement, QuarantineState
from tartarus.sandbox.reap import reap_workdir
from tartarus.sandbox.saved import SavedSandbox, pinned
from tartarus.sandbox.spec import Admission, SandboxSpec
from tartarus.sandbox.throttle import apply_bandwidth, throttle_disks
from tartarus.sealing import EnvSeal
from tartarus.snapshots.snapshot import Snapshot
from tartarus.templates.built import Template

log = logging.getLogger(__name__)

# A ready sandbox's clock and entropy were set when it was restored; one that has waited longer than
# this is told them again when a create binds it (a round trip to its agent, ~1-2 ms under TCG).
CLOCK_RESYNC_S = 60.0
LAYER_DRIVE = 1  # vm_config's drives: the template's read-only root, then the sandbox's writable layer


def new_sandbox_id() -> str:
    return "sb-" + secrets.token_hex(6)


@dataclass(frozen=True)
class GuestState:
    """What a prepared VMM loads over the snapshot's memory: the snapshot's own state (a new clone), or
    a captured sandbox's (the same sandbox waking, or a copy of a checkpoint)."""

    path: Path
    interpreter_pid: int | None
    new_identity: bool = True  # a clone gets its own hostname and machine-id; a woken sandbox keeps its
    mapped: bool = False  # its pages are in the memory file the VMM maps (a lazy wake): not copied in


def compatible(snapshot: Snapshot, spec: SandboxSpec) -> bool:
    """A restore keeps the snapshot's vCPUs and memory; other shapes need a cold boot."""
    return spec.vcpus in (None, snapshot.vcpus) and spec.memory_mib in (None, snapshot.memory_mib)


class Sandbox:
    """The host-side object for one sandbox (the daemon keeps one per running sandbox)."""

    def __init__(
        self,
        id_: str,
        template: Template,
        workdir: Path,
        spec: SandboxSpec | None = None,
        *,
        limits: Limits | None = None,
        outlive_owner: bool = False,
        backend: Backend | None = None,
    ) -> None:
        self.id = id_
        self.template = template
        self.workdir = workdir
        self.spec = spec or SandboxSpec(template.name)
        self.limits = limits  # resolved by admission (template + request, capped by policy)
        self.outlive_owner = outlive_owner  # its VMM outlives the daemon (live restore)
        self.created_at = time.time()
        self.vm: MicroVM | None = None
        self.container: GvisorContainer | None = None  # instead of `vm` on the gvisor backend
        self._backend = backend  # None: a VM, under the host's accelerator
        self.interpreter: CodeInterpreter | None = None
        self.timings: dict[str, float] = {}
        self.network: SandboxNetwork | None = None
        self.cgroup: SandboxCgroup | None = None
        self.quarantined: QuarantineState | None = None  # set by `quarantine`, never by the guest

    @property
    def env(self) -> dict[str, str]:
        base = sandbox_env(self.template) if self.backend == "gvisor" else self.template.env
        return {**base, **self.spec.env}

    @property
    def backend(self) -> Backend:
        if self._backend is not None:
            return self._backend
        if self.vm is not None:
            return "kvm" if self.vm.config.accel == "kvm" else "tcg"
        return "tcg" if self.container is None else "gvisor"

    @property
    def engine(self) -> Engine | None:
        """What runs the guest: the VM or the gVisor container (None before it starts)."""
        return self.vm if self.vm is not None else self.container

    @property
    def exit_message(self) -> str:
        if self.container is not None:
            return self.container.exit_message()
        return (self.vm.exit_message if self.vm else None) or "VM exited"

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Have `callback` told when the guest's host process ends (not when `destroy` ends it)."""
        if self.vm is not None:
            self.vm.on_exit = lambda vm: callback()
        elif self.container is not None:
            self.container.on_exit = callback

    @property
    def agent(self) -> AgentClient:
        engine = self.engine
        if engine is None or engine.agent is None:
            raise SandboxFailed(f"sandbox {self.id} is not running")
        if not engine.running:
            raise SandboxFailed(f"sandbox {self.id} has stopped: {self.exit_message}")
        return engine.agent

    # ---- starting -------------------------------------------------------------------------------

    @classmethod
    async def boot(
        cls,
        template: Template,
        root: Path,
        spec: SandboxSpec | None = None,
        *,
        limits: Limits | None = None,
        outlive_owner: bool = False,
    ) -> Sandbox:
        """Cold-boot a sandbox: fresh VM, kernel boot, agent ready. Cleans up everything on failure."""
        id_ = new_sandbox_id()
        workdir = root / id_
        workdir.mkdir(mode=PRIVATE_DIR, parents=True)
        sandbox = cls(id_, template, workdir, spec, limits=limits, outlive_owner=outlive_owner)
        try:
            await sandbox._boot()
        except BaseException:
            await sandbox.destroy()
            raise
        return sandbox

    async def _boot(self) -> None:
        t0 = time.perf_counter()
        await self._attach_network()
        self._attach_cgroup()
        layer = create_layer(self.workdir / LAYER)
        self.vm = MicroVM(self.vm_config(layer=layer), self.workdir)
        await self.vm.start()
        self.timings["vmm_ready"] = self.vm.timings["vmm_ready"]
        await self.vm.wait_agent(self.spec.boot_timeout)
        self.timings["agent_ready"] = time.perf_counter() - t0

    @classmethod
    async def start_gvisor(
        cls,
        template: Template,
        root: Path,
        spec: SandboxSpec | None = None,
        *,
        limits: Limits | None = None,
        prepared: Sandbox | None = None,
        outlive_owner: bool = False,
    ) -> Sandbox:
        """A gVisor sandbox of `template`: restored from the template's warm image (its interpreter has
        the template's modules imported), or started fresh when the template has no interpreter or
        its image cannot be built. Its writable layer is its own, in its directory. `prepared` is a
        pool's spare (`prepare_gvisor`) to restore into: only the restore is then on the clock."""
        if prepared is None:
            id_ = new_sandbox_id()
            workdir = root / id_
            workdir.mkdir(mode=PRIVATE_DIR, parents=True)
            sandbox = cls(id_, template, workdir, spec, limits=limits, backend="gvisor")
        else:  # a spare predates the request: its spec and limits are this one's from now on
            sandbox = prepared
            sandbox.spec, sandbox.limits = spec or SandboxSpec(template.name), limits
            sandbox.created_at = time.time()
        sandbox.outlive_owner = outlive_owner
        if sandbox.container is not None:
            sandbox.container.keep_channel = outlive_owner
        try:
            await sandbox._start_gvisor()
        except BaseException:
            await sandbox.destroy()
            raise
        return sandbox

    @classmethod
    async def prepare_gvisor(
        cls, template: Template, root: Path, *, limits: Limits, sandbox_id: str | None = None
    ) -> Sandbox:
        """A gVisor sandbox whose container runsc has created (sandbox and gofer processes up, in its
        network and cgroups) for the template's warm image to be restored into: what a pool keeps."""
        image = await _warm_image(template)
        if image is None:
            raise InvalidArgument(f"template {template.name!r} has no warm gVisor image to restore")
        id_ = sandbox_id or new_sandbox_id()
        workdir = root / id_
        workdir.mkdir(mode=PRIVATE_DIR, parents=True)
        sandbox = cls(id_, template, workdir, limits=limits, backend="gvisor")
        try:
            container = await sandbox._gvisor_container(image.spec)
            await container.create()
        except BaseException:
            await sandbox.destroy()
            raise
        return sandbox

    async def _gvisor_container(self, spec: BundleSpec) -> GvisorContainer:
        """The sandbox's container, contained as a VM is: its own network (a veth NIC, which runsc's
        netstack adopts, behind the same rules; policy `none` until `contain`) and its cgroups (gVisor's
        overhead on top of the guest's limits), both made before runsc starts and handed to the
        container, which does not own them: `destroy` removes the container first, then the network,
        then the cgroups."""
        await self._attach_network(nic="veth")
        self._attach_cgroup(GVISOR)
        self.container = GvisorContainer(
            self.id, spec, self.workdir / CONTAINER_DIR, network=self.network, cgroup=self.cgroup
        )
        self.container.keep_channel = self.outlive_owner  # taken over by the next daemon (`attach`)
        return self.container

    async def _start_gvisor(self) -> None:
        t0 = time.perf_counter()
        image = await _warm_image(self.template)
        pooled = self.container is not None
        if self.container is not None:  # a spare: made with the template's limits, sized to these now
            self._attach_cgroup(GVISOR)
            container = self.container
        else:
            container = await self._gvisor_container(
                bundle_spec(self.template) if image is None else image.spec
            )
        # Spans, cumulative from the create call: where a gVisor create's time goes (bench cold-start).
        spans = {"pooled": float(pooled), "contained": time.perf_counter() - t0}
        if image is None:
            await container.start(self.spec.boot_timeout)
            self.timings = {**spans, "agent_ready": time.perf_counter() - t0}
            return
        await container.create()
        spans["runsc_created"] = time.perf_counter() - t0
        await container.restore(image.path, self.spec.boot_timeout)
        spans["agent_ready"] = time.perf_counter() - t0
        spans["state_loaded"] = spans["runsc_created"] + container.timings["restored"]
        self.timings = spans
        agent = self.agent
        # Its clock and entropy are the host's (gVisor's own); a clone gets its own machine-id. The
        # hostname stays the image's: gVisor denies the agent sethostname.
        await agent.configure(machine_id=uuid.uuid4().hex)
        self.timings["configured"] = time.perf_counter() - t0
        self.interpreter = CodeInterpreter.adopt(agent, image.interpreter_pid)
        if self.spec.env:
            await self.interpreter.set_env(self.spec.env)
        self.timings["first_answer"] = time.perf_counter() - t0

    @classmethod
    async def prepare(
        cls,
        snapshot: Snapshot,
        template: Template,
        root: Path,
        *,
        limits: Limits | None = None,
        outlive_owner: bool = False,
        nice: int = 0,
        sandbox_id: str | None = None,
        layer_source: Path | None = None,
        layer: Path | None = None,
        memory: Callable[[Path], Path] | None = None,
    ) -> Sandbox:
        """A VMM waiting for incoming state (what a pool keeps ready; `restore` brings it to life). Its
        writable layer is a sparse copy of `layer_source` (default: the snapshot's), or the existing
        file `layer` used in place (a hibernated sandbox's). Its RAM maps the snapshot's memory file,
        or the one `memory` makes in the working directory (a lazy wake's)."""
        id_ = sandbox_id or new_sandbox_id()
        sandbox = cls(id_, template, root / id_, limits=limits, outlive_owner=outlive_owner)
        sandbox.workdir.mkdir(mode=PRIVATE_DIR, parents=True)
        try:
            t0 = time.perf_counter()
            if layer is None:
                layer = sandbox.workdir / LAYER
                await _copy_off_loop(layer_source or snapshot.layer, layer)
            memory_file = snapshot.memory
            if memory is not None:
                memory_file = await asyncio.to_thread(memory, sandbox.workdir)
            await sandbox._attach_network()
            sandbox._attach_cgroup()
            config = sandbox.vm_config(layer=layer, memory_file=memory_file, share=False)
            config.incoming = True
            sandbox.vm = MicroVM(config, sandbox.workdir)
            await sandbox.vm.start(nice=nice)
            sandbox.timings["vmm_ready"] = time.perf_counter() - t0
        except BaseException:
            await sandbox.destroy()
            raise
        return sandbox

    @classmethod
    async def restore(
        cls,
        snapshot: Snapshot,
        template: Template,
        root: Path,
        spec: SandboxSpec | None = None,
        prepared: Sandbox | None = None,
        *,
        limits: Limits | None = None,
        outlive_owner: bool = False,
        nice: int = 0,
    ) -> Sandbox:
        """A new sandbox from the template's snapshot, in the pooled VMM `prepared` if one is given
        (left at priority `nice`: a ready pool's refill runs low)."""
        t0 = time.perf_counter()
        sandbox = prepared or await cls.prepare(
            snapshot, template, root, limits=limits, outlive_owner=outlive_owner
        )
        vmm_ready = 0.0 if prepared else time.perf_counter() - t0
        state = GuestState(snapshot.state, snapshot.interpreter_pid)
        await sandbox._resume(
            sandbox.id,
            spec or SandboxSpec(template.name),
            limits,
            state,
            t0,
            vmm_ready,
            bool(prepared),
            nice=nice,
        )
        return sandbox

    async def _resume(
        self,
        id_: str,
        spec: SandboxSpec,
        limits: Limits | None,
        state: GuestState,
        t0: float,
        vmm_ready: float,
        pooled: bool,
        on_loaded: Callable[[], None] | None = None,
        nice: int = 0,
    ) -> None:
        """Bring this prepared VMM to a running, distinct clone of the snapshot (or to `state`): the
        hot path of a create; only this is on its clock when the VMM was pooled."""
        self.id, self.spec, self.limits = id_, spec, limits  # a pooled VMM predates the request
        self.created_at = time.time()
        self.timings = {"vmm_ready": vmm_ready, "pooled": float(pooled)}
        vm = self.vm
        assert vm is not None
        try:
            if pooled:
                vm.set_priority(nice)
                self._attach_cgroup()  # a pooled VMM was started before this request's limits were known
            await load(vm, state.path, mapped=state.mapped)
            failpoints.hit("restore.loaded")
            if on_loaded is not None:
                on_loaded()  # the last moment at which no guest has run: a wake commits here
            self.timings["state_loaded"] = time.perf_counter() - t0
            await vm.resume()
            self.timings["guest_resumed"] = time.perf_counter() - t0
            agent = vm.agent_client()
            agent.assume_running()
            # Clones share the snapshot's clock, RNG pool, hostname and machine-id until told otherwise; a
            # woken sandbox keeps its names but its clock stopped and its entropy was seen on disk.
            await agent.configure(
                time_ns=time.time_ns(),
                entropy=os.urandom(64),
                hostname=self.id if state.new_identity else None,
                machine_id=uuid.uuid4().hex if state.new_identity else None,
            )
            if state.interpreter_pid is not None:  # after CONFIGURE told the agent's version (its credit)
                self.interpreter = CodeInterpreter.adopt(agent, state.interpreter_pid)
                if state.new_identity and spec.env:  # a woken one has had its env since its create
                    await self.interpreter.set_env(spec.env)
            self.timings["first_answer"] = time.perf_counter() - t0
        except BaseException:
            await self.destroy()
            raise

    async def bind(self, spec: SandboxSpec, limits: Limits) -> None:
        """Give this ready sandbox (restored, made distinct and warmed while no request waited:
        `snapshots.ready`) to the request `spec`: its limits, the clock and fresh entropy again if it
        waited long, its env in the interpreter (commands get it with each exec). Its network and the
        rest of what admission decided follow (`contain`). Destroyed on failure."""
        t0, waiting_since = time.perf_counter(), self.created_at
        self.spec, self.limits, self.created_at = spec, limits, time.time()
        # Cumulative from the create call, as a restore's are: everything up to the resume was before it.
        self.timings = {"vmm_ready": 0.0, "state_loaded": 0.0, "guest_resumed": 0.0, "ready": 1.0}
        try:
            if self.vm is not None:
                self.vm.set_priority(0)
            self._attach_cgroup()
            # A gVisor sandbox's clock is the host's (the Sentry reads it): never stale.
            if self.vm is not None and time.time() - waiting_since > CLOCK_RESYNC_S:
                await self.agent.configure(time_ns=time.time_ns(), entropy=os.urandom(64))
            if spec.env and self.interpreter is not None:
                await self.interpreter.set_env(spec.env)
            self.timings["first_answer"] = time.perf_counter() - t0
        except BaseException:
            await self.destroy()
            raise

    @property
    def alive(self) -> bool:
        """Its agent serves and its VMM has not exited (asked of the kernel: `vm.running` learns of a
        death only later). Cheap: no guest round trip."""
        if self.container is not None:
            agent, pid = self.container.agent, self.container.pid
            if not (self.container.running and agent is not None and agent.serving and pid is not None):
                return False
            return _running(pid)  # not our child: asked through a pidfd, which the watcher reads later
        vm = self.vm
        pid = vm.pid if vm is not None and vm.running and vm.agent and vm.agent.serving else None
        if pid is None:
            return False
        try:
            return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:
            return False

    @classmethod
    async def wake(
        cls,
        saved: SavedSandbox,
        layout: Layout,
        spec: SandboxSpec,
        *,
        limits: Limits | None = None,
        outlive_owner: bool = False,
        prepared: Sandbox | None = None,
    ) -> tuple[Sandbox, Snapshot | None]:
        """The hibernated sandbox `saved` running again, the same sandbox (id, names, files)."""
        return await cls._from_saved(saved, layout, spec, limits, outlive_owner, prepared, wake=True)

    @classmethod
    async def copy(
        cls,
        saved: SavedSandbox,
        layout: Layout,
        spec: SandboxSpec,
        *,
        limits: Limits | None = None,
        outlive_owner: bool = False,
        prepared: Sandbox | None = None,
    ) -> tuple[Sandbox, Snapshot | None]:
        """A new sandbox from the checkpoint `saved`: its memory, processes and files, its own identity."""
        return await cls._from_saved(saved, layout, spec, limits, outlive_owner, prepared, wake=False)

    @classmethod
    async def _from_saved(
        cls,
        saved: SavedSandbox,
        layout: Layout,
        spec: SandboxSpec,
        limits: Limits | None,
        outlive_owner: bool,
        prepared: Sandbox | None,
        *,
        wake: bool,
    ) -> tuple[Sandbox, Snapshot | None]:
        """A running sandbox from `saved`, with the (pinned) snapshot under it, which a later capture
        of it needs. `prepared` is a pooled VMM of the same snapshot, waiting for incoming state; without
        one, a VMM is started. A wake commits as `tartarus.sandbox.capture` describes; a gVisor
        capture's (no snapshot under it) as `tartarus.sandbox.gvisor_capture` does."""
        if saved.bundle is not None:
            gvisor_capture.check_saved(saved)
            spec = dataclasses.replace(spec, env={**saved.env, **spec.env})
            id_ = saved.id if wake else new_sandbox_id()
            workdir = gvisor_capture.prepare_workdir(layout, id_, wake)
            sandbox = cls(id_, saved.template, workdir, spec, limits=limits, outlive_owner=outlive_owner,
                          backend="gvisor")  # fmt: skip
            await gvisor_capture.start_saved(sandbox, saved, layout, wake=wake)
            return sandbox, None
        try:
            snapshot = pinned(layout.pins, saved.snapshot_key)
        except FileNotFoundError:
            raise SandboxFailed(
                f"{saved.kind} {saved.id}: the snapshot it was captured from ({saved.snapshot_key}) is gone"
            ) from None
        spec = dataclasses.replace(
            spec, vcpus=saved.vcpus, memory_mib=saved.memory_mib, env={**saved.env, **spec.env}
        )
        sandbox_id = saved.id if wake else new_sandbox_id()
        workdir = layout.sandboxes / sandbox_id
        if wake and workdir.exists() and (prepared is None or prepared.workdir != workdir):
            reap_workdir(workdir)  # what a failed earlier wake left; the saved sandbox itself is intact
        # A waking saved sandbox moves here when it commits: out of hibernated/, so no one reuses it once
        # its guest may have run, yet outside the working directory a failed restore deletes
        # (`capture.recover_wakes`).
        waking = layout.sandboxes / f".{sandbox_id}.waking"
        committed = False

        def commit() -> None:
            nonlocal committed
            if wake:
                os.rename(saved.path, waking)
                fsync_path(saved.path.parent)
                committed = True
                failpoints.hit("wake.committed")
                (waking / RESUMED).touch(
                    mode=PRIVATE_FILE
                )  # from here a crash cannot tell whether the guest ran
                fsync_path(waking)

        t0 = time.perf_counter()
        found = _format_2(saved)
        memory = (
            None if prepared is not None or found is None else _lazy_memory(saved, layout, snapshot, found)
        )
        mapped = memory is not None
        layer_in_place = False
        if prepared is None:
            prepared = await cls.prepare(
                snapshot,
                saved.template,
                layout.sandboxes,
                limits=limits,
                outlive_owner=outlive_owner,
                sandbox_id=sandbox_id,
                layer=saved.layer if wake else None,
                layer_source=None if wake else saved.layer,
                memory=memory,
            )
        else:
            try:
                layer_in_place = await prepared._take_layer(saved, wake)
                mapped = await prepared._take_memory(saved, found)
            except BaseException:
                await prepared.destroy()
                raise
        vmm_ready = time.perf_counter() - t0
        state = GuestState(saved.state, saved.interpreter_pid, new_identity=not wake, mapped=mapped)
        sandbox = prepared
        try:
            t1 = time.perf_counter()
            await sandbox._resume(sandbox_id, spec, limits, state, t1, 0.0, True, commit)
            failpoints.hit("wake.resumed")  # its guest runs; its layer is still in the waking saved sandbox
        except BaseException:
            if committed and "guest_resumed" not in sandbox.timings:  # the guest never ran: undo
                (waking / RESUMED).unlink(missing_ok=True)
                os.rename(waking, saved.path)
            elif committed:
                with contextlib.suppress(Exception):
                    await sandbox.destroy()  # idempotent: a failed restore destroyed it already
                shutil.rmtree(waking, ignore_errors=True)
                log.error("sandbox %s failed while waking, after its guest resumed: it is lost", sandbox_id)
            raise
        sandbox.timings = {k: v + vmm_ready for k, v in sandbox.timings.items() if k != "pooled"}
        sandbox.timings["vmm_ready"] = vmm_ready
        if wake:
            sandbox.created_at = saved.created_at
            if not layer_in_place:
                sandbox._relocate_layer(waking / "layer.ext4")
            shutil.rmtree(waking, ignore_errors=True)
        return sandbox, snapshot

    async def _take_layer(self, saved: SavedSandbox, wake: bool) -> bool:
        """Give this pooled VMM (waiting with a fresh layer of its own) the saved layer: the hibernated
        sandbox's own file for a wake, a copy of the checkpoint's for a copy. Where reflinks exist, its
        own layer file is made to share the saved one's data instead, which no QEMU command has to
        follow (True: the layer stays where it is)."""
        assert self.vm is not None
        fresh = self.workdir / LAYER
        if reflink.supported(self.workdir) and fresh.stat().st_size == saved.layer.stat().st_size:
            await asyncio.to_thread(reflink.clone_into, saved.layer, fresh)
            return True
        if wake:
            layer = saved.layer
        else:
            layer = self.workdir / "incoming.ext4"
            sparse_copy(saved.layer, layer)
        await self.vm.replace_drive(LAYER_DRIVE, layer)
        fresh.unlink()
        if not wake:
            self._relocate_layer(layer)
        return False

    async def _take_memory(self, saved: SavedSandbox, found: image.Image | None) -> bool:
        """Clone the saved pages into this pooled VMM's memory file if it has one of its own (a lazy
        spare, `lazy.template_clone`): True, and the wake loads the device state only."""
        vm = self.vm
        assert vm is not None and vm.config.memory_file is not None
        if found is None or vm.pid is None or vm.config.memory_file.name != lazy.MEMORY:
            return False
        await asyncio.to_thread(lazy.fill, vm.config.memory_file, saved.state, found, vm.pid)
        return True

    def _relocate_layer(self, path: Path) -> None:
        """Move the layer QEMU has open (at `path`) to its place in the working directory."""
        assert self.vm is not None
        drives = self.vm.config.drives
        os.rename(path, self.workdir / LAYER)
        drives[LAYER_DRIVE] = dataclasses.replace(drives[LAYER_DRIVE], path=self.workdir / LAYER)

    async def start_vm(self, config: VMConfig, *, wait_agent: bool = True) -> MicroVM:
        """Start a VM of `config` for this sandbox and wait for its agent (the template tooling's boot,
        `snapshots.build`, which saves its state rather than serve it)."""
        vm = self.vm = MicroVM(config, self.workdir)
        try:
            await vm.start()
            if wait_agent:
                await vm.wait_agent(self.spec.boot_timeout)
        except BaseException:
            await vm.kill()
            raise
        return vm

    # ---- what it is given -----------------------------------------------------------------------

    async def attach_network(self, name: str | None = None) -> None:
        """The network a snapshot's boot gives its VM (`snapshots.build`), under its own `name`."""
        await self._attach_network(name)

    async def _attach_network(self, name: str | None = None, *, nic: NicKind = "tap") -> None:
        """Give the sandbox its namespace, NIC (a TAP for a VMM, a veth for gVisor) and uplink (policy
        `none`) before its VMM or container starts.

        Runs on a thread (tens of ms of iproute2 that must not stall other sandboxes' creates); if
        the caller is cancelled meanwhile, it still waits for the thread so `destroy` can undo it."""
        create = functools.partial(SandboxNetwork.create, self.workdir, name or self.id, nic=nic)
        task = asyncio.ensure_future(asyncio.to_thread(create))
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

    def _attach_cgroup(self, overhead: Overhead = VMM) -> None:
        """Put the VMM (to be started, or already running) in cgroups sized by the sandbox's limits plus
        the host side's `overhead` (a gVisor sandbox's runsc joins them itself, at `runsc create`).
        A pooled VMM is already in a group made with its template's limits: only a resize, if any."""
        if self.limits is None:
            return
        if self.cgroup is not None:
            self.cgroup.resize(self.limits)
            return
        self.cgroup = SandboxCgroup.create(self.id, self.limits, overhead)
        if self.vm is not None and self.vm.pid is not None:
            self.cgroup.add(self.vm.pid)

    async def grow_disk(self, mib: int) -> None:
        """Grow the writable layer to `mib` MiB, live (never shrinks): QEMU grows the file and tells the
        guest, whose agent then grows the filesystem online."""
        if self.container is not None:
            return  # its layer is a directory of runsc's: no size to grow (its limit is a cgroup's)
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
            vcpus=self.spec.vcpus or self.template.vcpus,
            memory_mib=self.spec.memory_mib or self.template.memory_mib,
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
        config.outlive_owner = self.outlive_owner
        # Jailed (own uid, own filesystem view) when root can make it so, a snapshot's build VM too.
        config.jail = os.geteuid() == 0
        return config

    async def code_interpreter(self) -> CodeInterpreter:
        """The warm interpreter (adopted from the snapshot), or one started now on a cold-booted VM."""
        if self.interpreter is None:
            if self.template.preload is None:
                raise InvalidArgument(f"template {self.template.name!r} has no code interpreter")
            self.interpreter = await CodeInterpreter.start(self.agent, self.template.preload)
        return self.interpreter

    # ---- containment ----------------------------------------------------------------------------

    async def contain(self, admission: Admission, confinement: Confinement, state_dir: Path) -> None:
        """Apply what admission decided to this sandbox, now that it runs: quarantine if that was the
        verdict (the gate closes before its egress rules exist), its egress, the guest process cap,
        its disk size. Records how long that took as the `containment` timing (a duration)."""
        t0 = time.perf_counter()
        if admission.limits.bandwidth.limited:  # a new VMM has none: unlimited costs no call
            await apply_bandwidth(self.vm, self.network, admission.limits.bandwidth)
        if admission.decision.quarantined:
            await self.quarantine(admission.decision.reason, admission.by, confinement, state_dir)
        if admission.network.mode != "none" and self.network is not None:
            await self.network.apply(admission.network)
            if admission.network.hosts:
                await pin_names(self.agent, admission.network.hosts)
            if admission.network.mode == "full":
                await use_relay(self.agent, GATEWAY)
        if admission.limits.max_processes is not None:
            await set_max_processes(self.agent, admission.limits.max_processes)
        await self.grow_disk(admission.limits.disk_mib)
        self.timings["containment"] = time.perf_counter() - t0

    async def quarantine(
        self, reason: str, by: str, confinement: Confinement, state_dir: Path
    ) -> QuarantineState:
        """Confine it live ("Typhon"): the network cut first (the urgent part), then CPU, memory and disk
        rates clamped, then the audit record. Its own policy stays in place behind the closed gate, for a
        release to reopen. A gVisor sandbox has no disk rate to clamp (that is QEMU's): the rest holds."""
        if self.quarantined is not None:
            raise Conflict(f"sandbox {self.id} is already quarantined ({self.quarantined.reason})")
        t0 = time.perf_counter()
        if self.network is not None:
            self.network.cut()
        cut_ms = (time.perf_counter() - t0) * 1000
        if self.cgroup is not None:
            self.cgroup.clamp(confinement.cpu_fraction, confinement.memory_mib)
        state = QuarantineState(time.time(), reason, by, self.limits)
        self.quarantined = state
        audit.record(
            state_dir,
            "sandbox.quarantine",
            sandbox=self.id,
            template=self.template.name,
            reason=reason,
            by=by,
            network_cut_ms=round(cut_ms, 3),
            cpu_fraction=confinement.cpu_fraction,
            memory_mib=confinement.memory_mib,
            disk_bytes_per_s=confinement.bandwidth.disk_bytes_per_s,
            disk_iops=confinement.bandwidth.disk_iops,
        )
        own = self.limits.bandwidth if self.limits else Bandwidth()
        await throttle_disks(self.vm, own.tightened(confinement.bandwidth))  # last: it needs a live VMM
        return state

    async def release(self, state_dir: Path, *, by: str) -> None:
        """Operator release: the requested network and the sandbox's own limits come back."""
        state = self.quarantined
        if state is None:
            raise Conflict(f"sandbox {self.id} is not quarantined")
        if self.cgroup is not None and state.limits is not None:
            self.cgroup.release(state.limits)
        await throttle_disks(self.vm, state.limits.bandwidth if state.limits else Bandwidth())
        if self.network is not None:
            await self.network.reconnect()
        self.quarantined = None
        audit.record(
            state_dir,
            "sandbox.release",
            sandbox=self.id,
            by=by,
            quarantined_for_s=round(time.time() - state.since, 3),
            reason=state.reason,
        )

    # ---- capturing ------------------------------------------------------------------------------

    async def hibernate(
        self,
        snapshot: Snapshot | None,
        layout: Layout,
        quota_bytes: int | None = None,
        *,
        timings: dict[str, float] | None = None,
        own_pages_only: bool = True,
        exposed: Any = None,
    ) -> SavedSandbox:
        """Capture to `<state>/hibernated/<id>` and stop (`capture.hibernate`: its commit point)."""
        if self.container is not None:
            return await gvisor_capture.hibernate(self, layout, quota_bytes, timings=timings, exposed=exposed)
        return await capture.hibernate(
            self,
            snapshot,
            layout,
            quota_bytes,
            timings=timings,
            own_pages_only=own_pages_only,
            exposed=exposed,
        )

    async def checkpoint(
        self,
        snapshot: Snapshot | None,
        layout: Layout,
        checkpoint_id: str,
        ttl_s: float | None = None,
        quota_bytes: int | None = None,
    ) -> SavedSandbox:
        """Capture to `<state>/checkpoints/<id>` and run on (`capture.checkpoint`)."""
        if self.container is not None:
            return await gvisor_capture.checkpoint(self, layout, checkpoint_id, ttl_s, quota_bytes)
        return await capture.checkpoint(self, snapshot, layout, checkpoint_id, ttl_s, quota_bytes)

    # ---- handing over ---------------------------------------------------------------------------

    def describe(self, seal: EnvSeal, *, snapshot: Path | None = None, exposed: Any = None) -> None:
        """Write this running sandbox down for the next daemon (`tartarus.sandbox.descriptor`)."""
        descriptor.write(self, seal, snapshot=snapshot, exposed=exposed)

    @classmethod
    async def attach(cls, found: Described, template: Template, workdir: Path) -> Sandbox:
        """Take over the sandbox a previous daemon described (`tartarus.sandbox.descriptor`). On failure
        the caller reaps `workdir` (VMM, namespace, cgroup, files); what this process had opened for it
        (relay, connections) is closed here."""
        backend: Backend | None = "gvisor" if found.gvisor is not None else None
        sandbox = cls(
            found.id, template, workdir, found.spec, limits=found.limits, outlive_owner=True, backend=backend
        )
        try:
            sandbox.created_at = found.created_at
            if found.network is not None:
                sandbox.network = SandboxNetwork.existing(workdir, found.network, cut_off=found.cut_off)
                await sandbox.network.resume_services()
            if found.cgroup:
                sandbox.cgroup = SandboxCgroup.existing(found.cgroup, found.limits)
            sandbox.quarantined = found.quarantine
            if found.gvisor is not None:
                sandbox.container = await GvisorContainer.attach(
                    found.id, found.gvisor, workdir / CONTAINER_DIR, network=sandbox.network,
                    cgroup=sandbox.cgroup,
                )  # fmt: skip
            else:
                assert found.vm_config is not None
                sandbox.vm = await MicroVM.attach(
                    found.vm_config, workdir, found.vmm_pid, drive_nodes=found.drive_nodes
                )
            if found.interpreter_pid is not None:
                sandbox.interpreter = CodeInterpreter.reattach(sandbox.agent, found.interpreter_pid)
        except BaseException:
            await sandbox.detach()
            raise
        return sandbox

    async def detach(self) -> None:
        """Let go of a sandbox that keeps running (a daemon stopping for the next one to take it over):
        what the daemon serves into it stops; the VM, its namespace and its cgroup stay."""
        if self.network is not None:
            await self.network.release()
        if self.vm is not None:
            await self.vm.detach()
        if self.container is not None:
            await self.container.detach()

    async def destroy(self) -> None:
        """Kill the VM and wipe everything the sandbox wrote ("Lethe"). Idempotent."""
        if self.vm is not None:
            await self.vm.kill()
        if self.container is not None:  # its processes, runsc state and writable layer, before its network
            await self.container.destroy()
        cgroup, self.cgroup = self.cgroup, None
        # On a thread: the kernel refuses to remove the cgroup (EBUSY) until the dead VMM's memory is torn
        # down, which the removal waits for (tens of ms for a large guest), and the files are GBs sparse.
        # The network (tens of ms of netlink) goes meanwhile: the two share nothing.
        results = await asyncio.gather(
            self.destroy_network(),
            asyncio.to_thread(_remove_leftovers, cgroup, self.workdir),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result


def _running(pid: int) -> bool:
    """Whether process `pid` has not exited (a pidfd turns readable when it has)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        return not select.select([fd], [], [], 0)[0]
    finally:
        os.close(fd)


def _format_2(saved: SavedSandbox) -> image.Image | None:
    """The saved sandbox's image layout, if it is format 2 (None for format 1, or if unreadable: the
    load says why)."""
    try:
        return image.read_header(saved.state)
    except (OSError, image.ImageError):
        return None


def _lazy_memory(
    saved: SavedSandbox, layout: Layout, snapshot: Snapshot, found: image.Image
) -> Callable[[Path], Path] | None:
    """What makes a waking VMM's memory file (`tartarus.hibernation.lazy`), or None where a lazy wake is
    impossible (no reflinks on the state directory's filesystem): the pages are then copied in before
    the guest runs."""
    if not lazy.available(layout.state_dir, found):
        return None

    def memory(workdir: Path) -> Path:
        dest = workdir / lazy.MEMORY
        lazy.build(snapshot.memory, saved.state, found, dest)
        return dest

    return memory


def _remove_leftovers(cgroup: SandboxCgroup | None, workdir: Path) -> None:
    if cgroup is not None:
        cgroup.destroy()
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(workdir)


async def _warm_image(template: Template) -> WarmImage | None:
    """The template's warm gVisor image (built off the event loop on first use), or None: the template
    has no interpreter, or the image could not be built (logged; the sandbox starts fresh)."""
    if template.preload is None:
        return None
    try:
        return await asyncio.to_thread(warm_image, template)
    except Exception as e:
        log.warning("no warm gVisor image of %s (%s): starting fresh", template.name, e)
        return None


async def _copy_off_loop(source: Path, layer: Path) -> None:
    """`sparse_copy` on a worker thread: usually under a millisecond, but several on a busy disk, and a
    pool refill runs it while the daemon answers requests. A cancelled caller still waits for the copy
    to end, so the clean-up that follows never races a file being written."""
    copy = asyncio.ensure_future(asyncio.to_thread(sparse_copy, source, layer))
    try:
        await asyncio.shield(copy)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await copy
        raise
