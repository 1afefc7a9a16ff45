"""One gVisor sandbox: a runsc container running the guest agent, with the agent channel connected.

The same surface the VMM side (`runtime.vm.MicroVM`) offers a sandbox: `start`, an `AgentClient` on
`agent`, `kill`, `destroy`. The channel is one end of a socketpair given to `runsc create` as the
container's stdin; the agent serves the protocol on it (gvisor/spec.py). Everything the container
holds on the host lives in its work directory, which `destroy` removes:

    workdir/bundle/config.json   the OCI spec
    workdir/layer/               the writable overlay's backing file (runsc `--overlay2=root:dir=`)
    workdir/runsc/               runsc's state for this container (its `--root`)
    workdir/console.log          the container's stdout and stderr (the agent's own log lines)
    workdir/sandbox.pid          runsc's sandbox process (`runsc create --pid-file`)
    workdir/logs/                runsc's log per command (create, boot, gofer, ...): why a start failed
    workdir/channel.json         the channel keeper's pid and fd (only for a sandbox that outlives its daemon)

A container that outlives its daemon (`keep_channel`) has a keeper: a `sleep` in a session of its own
that holds a copy of the host's end of the channel, so the agent never sees it close when the daemon
dies, and from which the next daemon takes that end with `pidfd_getfd` (`attach`). The runsc sandbox
and gofer are in their own session already (runsc starts them so): no terminal hang-up reaches them.

Contained like a VM sandbox when given the sandbox's network (made with `nic="veth"`) and cgroup, which
the caller owns and removes after `destroy`: runsc runs in the network's NIC namespace behind its
egress rules, and its processes in the cgroup (gvisor/containment.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tartarus import private
from tartarus.bootfiles.initramfs import initramfs_path
from tartarus.errors import SandboxFailed, TartarusError
from tartarus.gvisor.containment import launch_prefix
from tartarus.gvisor.rootfs import template_tree
from tartarus.gvisor.runsc import global_flags, runsc_binary
from tartarus.gvisor.spec import BundleSpec, config_json
from tartarus.limits.cgroups import SandboxCgroup
from tartarus.network.sandbox import SandboxNetwork
from tartarus.runtime.agent import AgentClient
from tartarus.templates.built import Template

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 30.0
GONE_TIMEOUT_S = 5.0
CHECKPOINT_TIMEOUT_S = 120.0
CONSOLE = "console.log"
CHANNEL = "channel.json"
SYS_PIDFD_GETFD = 438  # the same number on every architecture Linux has added it to


@dataclass(frozen=True)
class Layout:
    """Where one container's pieces live under its work directory."""

    workdir: Path

    @property
    def bundle(self) -> Path:
        return self.workdir / "bundle"

    @property
    def layer(self) -> Path:
        return self.workdir / "layer"

    @property
    def state(self) -> Path:
        return self.workdir / "runsc"

    @property
    def console(self) -> Path:
        return self.workdir / CONSOLE

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def channel(self) -> Path:
        return self.workdir / CHANNEL

    @property
    def keeper_name(self) -> str:
        """The channel keeper's argv[0]: names the container it belongs to, as runsc's `--root` does."""
        return f"tartarus-channel:{self.state}"


def console_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def fatal_error(logs: Path) -> str | None:
    """runsc's own account of why a command failed: its first "FATAL ERROR" line (the cause; the later
    ones are the other processes seeing it). The sandbox and gofer processes log there, not on the
    stderr of the `runsc create` that started them."""
    found: list[tuple[str, str]] = []
    for path in sorted(logs.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            _, marker, why = line.partition("FATAL ERROR: ")
            if marker:
                found.append((line[1:21], why))  # glog lines: level letter, then "MMDD hh:mm:ss.uuuuuu"
    return min(found)[1] if found else None


def _parent(pid: str) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state letter; comm may hold ")"


def pids_under(state: Path) -> list[int]:
    """Host processes of this container: runsc's sandbox and gofer, which carry `--root=<state>` in
    their command line (no other container shares that directory), and their descendants (the
    platform's stub processes, whose command line is empty), and the channel keeper (`keeper_name`)."""
    marker = f"--root={state}".encode()
    keeper = Layout(state.parent).keeper_name.encode()
    found: set[int] = set()
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in argv or argv[0] == keeper:
                found.add(int(entry))
            parent = _parent(entry)
            if parent is not None:
                parents[int(entry)] = parent
    grew = True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return sorted(found)


class GvisorContainer:
    """A running gVisor sandbox of one template, driven through runsc. `workdir` must not exist yet:
    the container creates it and `destroy` removes it. `network` (a `nic="veth"` one) and `cgroup`
    contain it; without a network it has loopback only."""

    def __init__(
        self,
        id_: str,
        spec: BundleSpec,
        workdir: Path,
        *,
        network: SandboxNetwork | None = None,
        cgroup: SandboxCgroup | None = None,
    ) -> None:
        self.id = id_
        self.spec = spec
        self.network = network
        self.cgroup = cgroup
        self.paths = Layout(workdir)
        self.agent: AgentClient | None = None
        self.pid: int | None = None  # runsc's sandbox process on the host
        self.timings: dict[str, float] = {}
        self._exited = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        self._channel: socket.socket | None = None  # the host's end, until an AgentClient owns it
        self.on_exit: Callable[[], None] | None = None  # told once the sandbox process has ended
        self.keep_channel = False  # outlives its daemon: a keeper holds the channel (module docstring)
        self._keeper: subprocess.Popen[bytes] | None = None

    def _runsc(self, *args: str) -> list[str]:
        layer = f"--overlay2=root:dir={self.paths.layer}"
        logs = f"--debug-log={self.paths.logs}/%COMMAND%.log"
        flags = global_flags(self.paths.state, network=self.network is not None)
        # Only `create` starts processes that stay (the sandbox, the gofer): it alone joins the cgroup.
        cgroup = self.cgroup.paths if self.cgroup is not None and args[0] == "create" else []
        prefix = launch_prefix(
            cgroup_procs=[path / "cgroup.procs" for path in cgroup], hide_sysctl_net=self.network is not None
        )
        return [*prefix, str(runsc_binary()), *flags, layer, logs, *args]

    async def _run(self, *args: str, stdin: int | None = None, timeout: float = COMMAND_TIMEOUT_S) -> str:
        """Run one runsc command to completion; its stdout, or a `SandboxFailed` with its error."""
        hands_stdio = args[0] == "create"
        log_fd = os.open(self.paths.console, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._runsc(*args),
                stdin=stdin if stdin is not None else asyncio.subprocess.DEVNULL,
                # `create` hands its stdout and stderr to the container, which outlives any pipe.
                stdout=log_fd if hands_stdio else asyncio.subprocess.PIPE,
                stderr=log_fd if hands_stdio else asyncio.subprocess.PIPE,
                cwd=self.paths.workdir,
                env=private.CHILD_ENV,
            )
        finally:
            os.close(log_fd)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SandboxFailed(f"runsc {args[0]} did not finish within {timeout:.0f} s") from None
        if proc.returncode != 0:
            why = fatal_error(self.paths.logs) or err.decode(errors="replace").strip()
            why = why or console_tail(self.paths.console, 5)
            raise SandboxFailed(f"runsc {args[0]} failed: {why[-1000:] or f'exit status {proc.returncode}'}")
        return (out or b"").decode(errors="replace")

    async def start(self, timeout: float = 30.0) -> None:
        """Create and start the container and wait until its agent says hello. On any failure whatever
        was made is removed before the error is raised."""
        await self._launch(["start", self.id], None, timeout)

    async def restore(self, image: Path, timeout: float = 30.0) -> None:
        """Create the container from a `checkpoint` image instead of starting it fresh, and wait until
        the restored agent answers a ping on its new channel. One image restores any number of times,
        under new ids: the restored agent serves whatever socket this container gives as its stdin."""
        restore = ["restore", f"--image-path={image}", f"--bundle={self.paths.bundle}", "--detach", self.id]
        await self._launch(restore, image, timeout)

    async def create(self) -> None:
        """`runsc create`: the sandbox and gofer processes up with the agent's channel handed in, nothing
        running yet. A pool does this ahead of time (the expensive half of a restore); `start` and
        `restore` do it themselves when it was not done. On failure whatever was made is removed."""
        if self._channel is not None:
            return
        netns = self.network.nic_netns_path if self.network is not None else None
        self.paths.workdir.mkdir(mode=0o700)  # a new directory, all ours: `destroy` removes it whole
        for path in (self.paths.bundle, self.paths.layer, self.paths.state, self.paths.logs):
            path.mkdir(mode=0o700)
        private.write_private(self.paths.bundle / "config.json", config_json(self.spec, netns))
        host, guest = socket.socketpair()
        try:
            pid_file = self.paths.workdir / "sandbox.pid"
            try:
                t0 = time.perf_counter()
                if self.network is not None:
                    await asyncio.to_thread(self.network.reset_nic)
                self.timings["nic_reset"] = time.perf_counter() - t0
                create = ["create", f"--bundle={self.paths.bundle}", f"--pid-file={pid_file}", self.id]
                await self._run(*create, stdin=guest.fileno())
                self.timings["runsc_created"] = time.perf_counter() - t0
            finally:
                guest.close()
            self.pid = int(pid_file.read_text())
            self._watch = asyncio.create_task(self._watch_exit(self.pid), name=f"gvisor-watch-{self.id}")
        except BaseException:
            host.close()
            await self.destroy()
            raise
        self._channel = host

    async def _launch(self, run: list[str], image: Path | None, timeout: float) -> None:
        t0 = time.perf_counter()
        await self.create()
        try:
            t1 = time.perf_counter()
            await self._run(*run)
            self.timings["started"] = time.perf_counter() - t0
            self.timings["restored" if image is not None else "runsc_started"] = time.perf_counter() - t1
            host, self._channel = self._channel, None
            assert host is not None
            if self.keep_channel:
                self._keep(host)
            host.setblocking(False)
            reader, writer = await asyncio.open_unix_connection(sock=host, limit=1 << 21)
            self.agent = AgentClient(reader, writer, eof_reason=self._eof_reason)
            try:
                if image is None:
                    await asyncio.wait_for(self.agent.wait_hello(), timeout)
                else:  # the agent said hello before the checkpoint; it serves without another
                    self.agent.assume_running()
                    await asyncio.wait_for(self.agent.ping(), timeout)
            except TimeoutError:
                tail = console_tail(self.paths.console)
                raise SandboxFailed(
                    f"the guest agent did not answer within {timeout:.0f} s: {tail}"
                ) from None
            self.timings["agent_ready"] = time.perf_counter() - t0
        except BaseException:
            await self.destroy()
            raise

    async def checkpoint(self, image: Path, *, compress: bool = False, leave_running: bool = False) -> None:
        """Save the whole sandbox (memory, processes, the writable layer: runsc's overlay is in the
        image) into the directory `image`; the container stops, as runsc does by default, or runs on
        with its channel (`leave_running`: a hibernation stops it only once its image is committed).
        Take it while no request is in flight: bytes on the old channel are not part of the image.
        Uncompressed by default: restores are faster, the image about three times larger."""
        image.mkdir(mode=0o700, exist_ok=True)
        compression = "flate-best-speed" if compress else "none"
        leave = ["--leave-running"] if leave_running else []
        await self._run(
            "checkpoint", *leave, f"--compression={compression}", f"--image-path={image}", self.id,
            timeout=CHECKPOINT_TIMEOUT_S,
        )  # fmt: skip
        if not leave_running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exited.wait(), GONE_TIMEOUT_S)

    def _keep(self, host: socket.socket) -> None:
        """Start the channel keeper (module docstring) with a copy of `host`, in the container's
        cgroups, and write down where the next daemon finds it."""
        keeper = subprocess.Popen(
            [self.paths.keeper_name, "infinity"], executable=shutil.which("sleep") or "/bin/sleep",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(host.fileno(),), start_new_session=True, cwd=self.paths.workdir, env=private.CHILD_ENV,
        )  # fmt: skip
        self._keeper = keeper
        if self.cgroup is not None:
            self.cgroup.add(keeper.pid)
        record = {"pid": keeper.pid, "fd": host.fileno(), "sandbox_pid": self.pid}
        private.write_private(self.paths.channel, json.dumps(record))

    @classmethod
    async def attach(
        cls,
        id_: str,
        spec: BundleSpec,
        workdir: Path,
        *,
        network: SandboxNetwork | None = None,
        cgroup: SandboxCgroup | None = None,
        timeout: float = 10.0,
    ) -> GvisorContainer:
        """Take over the container an earlier daemon started in `workdir` and left running: its agent's
        channel is taken from the keeper, and resynchronised (`AgentClient.resync`: what the dead daemon
        left half-read is skipped). Raises `SandboxFailed` if it cannot be; the caller reaps."""
        box = cls(id_, spec, workdir, network=network, cgroup=cgroup)
        box.keep_channel = True
        try:
            record = json.loads(box.paths.channel.read_text())
            keeper, fd, pid = int(record["pid"]), int(record["fd"]), int(record["sandbox_pid"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SandboxFailed(f"gvisor container {id_} has no channel keeper to take over: {e}") from None
        ours = pids_under(box.paths.state)
        if pid not in ours or keeper not in ours:
            raise SandboxFailed(
                f"gvisor container {id_} no longer runs (its sandbox or channel keeper is gone)"
            )
        host = socket.socket(fileno=_take_fd(keeper, fd))
        box.pid = pid
        box._watch = asyncio.create_task(box._watch_exit(pid), name=f"gvisor-watch-{id_}")
        try:
            host.setblocking(False)
            reader, writer = await asyncio.open_unix_connection(sock=host, limit=1 << 21)
            box.agent = AgentClient(reader, writer, eof_reason=box._eof_reason, resync=True)
            await box.agent.resync(timeout)
        except BaseException:
            host.close()
            await box.detach()
            raise
        return box

    async def detach(self) -> None:
        """Let go of a container that runs on for the next daemon: close this process's end of the
        channel (the keeper holds another) and stop watching; its processes and files stay."""
        if self.agent is not None:
            await self.agent.close()
            self.agent = None
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None

    async def _watch_exit(self, pid: int) -> None:
        """Set `_exited` when the sandbox process ends (it is not our child: runsc create forked it)."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._exited.set()
            return
        try:
            await _readable(fd)
        finally:
            os.close(fd)
        self._exited.set()
        if self.agent is not None:
            self.agent.fail(SandboxFailed(self.exit_message()))
        if self.on_exit is not None:
            self.on_exit()

    @property
    def running(self) -> bool:
        return self.pid is not None and not self._exited.is_set()

    def exit_message(self) -> str:
        tail = console_tail(self.paths.console, 10)
        return "the gVisor sandbox exited" + (f": {tail}" if tail else "")

    async def _eof_reason(self) -> str:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._exited.wait(), GONE_TIMEOUT_S)
        if self._exited.is_set():
            return self.exit_message()
        return "guest agent channel closed while the gVisor sandbox still runs"

    async def kill(self) -> None:
        """Stop everything in the sandbox now (SIGKILL to all its processes); its files stay until
        `destroy`."""
        if self.running:
            with contextlib.suppress(SandboxFailed):
                await self._run("kill", "--all", self.id, "KILL")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exited.wait(), GONE_TIMEOUT_S)

    async def destroy(self) -> None:
        """Kill the sandbox and remove all it held on the host: processes, runsc state, the writable
        layer, the work directory. Safe to call at any stage of `start`, and more than once.

        Not `runsc delete`: it spends 1.5-2 s polling a sandbox it has just killed. The container holds
        nothing outside its work directory but what its caller gave it (network, cgroup: the caller's
        to remove, once this returns; runsc's mounts live in the sandbox's own mount namespace), so
        killing its processes and removing the directory is all there is to undo."""
        if self.agent is not None:
            await self.agent.close()
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        try:
            await reap(self.paths.workdir)
        finally:
            if self._keeper is not None:  # killed with the container's processes: collect it
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._keeper.wait(GONE_TIMEOUT_S)
            if self._watch is not None:
                self._watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watch
            self._exited.set()


async def reap(workdir: Path) -> None:
    """Remove a container's processes and directory, whoever started it: `destroy`, and a daemon
    cleaning up after one killed with -9 (its started containers ended when their channel closed, but a
    container only created, a pool's spare, runs on)."""
    left = await kill_all(Layout(workdir).state, GONE_TIMEOUT_S)
    shutil.rmtree(workdir, ignore_errors=True)
    if left or workdir.exists():
        raise TartarusError(f"gvisor container {workdir.name}: could not remove all of it (pids {left})")


def _take_fd(pid: int, fd: int) -> int:
    """A copy of the open file `fd` of process `pid` (`pidfd_getfd`: root, or ptrace rights over it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        got = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got < 0:
            errno = ctypes.get_errno()
            raise SandboxFailed(f"cannot take the channel from its keeper {pid}: {os.strerror(errno)}")
        os.set_inheritable(got, False)
        return int(got)
    finally:
        os.close(pidfd)


async def _readable(fd: int) -> None:
    """Until `fd` polls readable (a pidfd: its process has exited)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():  # level-triggered: it may fire again before the waiter runs
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _kill_and_wait(pid: int, timeout: float) -> None:
    """SIGKILL one process through a pidfd (no pid-reuse race) and wait until it has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        await asyncio.wait_for(_readable(fd), timeout)
    except (ProcessLookupError, TimeoutError):
        pass
    finally:
        os.close(fd)


async def kill_all(state: Path, timeout: float) -> list[int]:
    """Kill every host process of the container whose runsc state is `state` (sandbox, gofer, the
    platform's stub processes) and wait for them; the pids still there after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while pids := pids_under(state):
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return pids
        await asyncio.gather(*(_kill_and_wait(pid, remaining) for pid in pids))
    return []


def agent_binary() -> Path:
    """The static guest agent the VMs' initramfs carries (built from agent/, cached by its sources)."""
    return initramfs_path().parent / "tartarus-agent"


async def start_container(
    template: Template, id_: str, workdir: Path, timeout: float = 30.0
) -> GvisorContainer:
    """A started gVisor sandbox of `template` whose agent has said hello."""
    spec = BundleSpec(
        rootfs=template_tree(template),
        agent=agent_binary(),
        hostname=id_,
        env=template.env,
        workdir=template.workdir,
    )
    container = GvisorContainer(id_, spec, workdir)
    await container.start(timeout)
    return container
