"""One QEMU microVM process: spawn, QMP, agent channel, lifecycle verbs, and why it ended.

QMP and the agent channel are unix sockets in the VM's directory that QEMU listens on. An embedded run
ties its VMMs to itself with PR_SET_PDEATHSIG (see `launcher`), so none outlives it. A daemon's VMMs
outlive the daemon instead (`VMConfig.outlive_owner`): a daemon that is killed or restarted leaves its
sandboxes running, and the next one reconnects to them (`MicroVM.attach`) or reaps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, Message, QMPClient

from tartarus import private
from tartarus.errors import SandboxFailed, Timeout
from tartarus.runtime import jail
from tartarus.runtime.agent import AgentClient
from tartarus.runtime.launcher import Identity, JailSpec, launch_argv
from tartarus.runtime.qemu import (
    AGENT_PORT,
    VMConfig,
    command_line,
    disk_node,
    environment,
    file_node,
    huge_pages,
)

log = logging.getLogger(__name__)

QMP_SOCKET = "qmp.sock"
AGENT_SOCKET = "agent.sock"
PID_FILE = "qemu.pid"
DEVICE_FDSET = 17  # the QMP fd set through which QEMU writes a hibernation's device state


class _QMP(QMPClient):
    """Two costs of qemu.qmp's logging, gone. A named client logs through a child logger of its own,
    and `logging` keeps every logger ever made: one per VM, a leak of ~0.5 KiB per sandbox in a
    long-running daemon; so no name. And its message hooks render every message to JSON for a debug
    line (an eager `str(msg)`) whether or not debug logging is on: ~6% of a daemon's event loop while it
    creates sandboxes. The hooks exist to be overridden; these log only when debug logging is on."""

    def __init__(self) -> None:
        super().__init__()

    def _cb_outbound(self, msg: Message) -> Message:
        return super()._cb_outbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    def _cb_inbound(self, msg: Message) -> Message:
        return super()._cb_inbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg


@contextlib.contextmanager
def _socket_path(path: Path) -> Iterator[str]:
    """A unix socket address holds 107 bytes; a deep state directory is reached via /proc/self/fd."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _listen(path: Path) -> socket.socket:
    """A listening socket at `path`, for QEMU to inherit; only root may connect."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _socket_path(path) as address:
            sock.bind(address)
        os.chmod(path, 0o600)
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _socket_path(path) as address:
            sock.connect(address)
    except BaseException:
        sock.close()
        raise
    sock = socket.socket(fileno=above_select(sock.detach()))
    sock.setblocking(False)
    return sock


# libnftables waits on its netlink socket with select(), and glibc aborts the whole process on a
# descriptor >= FD_SETSIZE: with ~250 sandboxes' handles filling the low numbers, the next sandbox's
# nftables context killed the daemon. A VMM's long-lived handles live above it instead.
FD_SETSIZE = 1024


def above_select(fd: int) -> int:
    """`fd` moved to a number >= FD_SETSIZE (the original closed), where the fd limit allows it."""
    try:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, FD_SETSIZE)
    except OSError:  # a soft limit of FD_SETSIZE or less: no number up there to have
        return fd
    os.close(fd)
    return high


def is_our_vmm(pid: int, workdir: Path) -> bool:
    """True if `pid` is a QEMU started for `workdir` (a recycled pid never matches)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    inside = os.fsencode(workdir) + b"/"
    return bool(argv) and b"qemu-system" in argv[0] and any(inside in a for a in argv)


class _Adopted:
    """A VMM this daemon did not spawn itself, watched and signalled through a pidfd (which, unlike a
    pid, cannot come to mean another process): one an earlier daemon started, whose exit status is not
    ours to see, or (`reap`) one the launcher cloned as our child into a PID namespace of its own,
    reaped here with its status."""

    def __init__(self, pid: int, *, reap: bool = False) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._reap = reap
        self._fd: int | None = above_select(os.pidfd_open(pid))
        self._gone = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._exited)

    def _exited(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            if self._reap:
                with contextlib.suppress(ChildProcessError):
                    self.returncode = _status(os.waitid(os.P_PIDFD, self._fd, os.WEXITED | os.WNOHANG))
            os.close(self._fd)
            self._fd = None
        self._gone.set()

    def kill(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._fd, signal.SIGKILL)

    async def wait(self) -> int | None:
        await self._gone.wait()
        return self.returncode


def _status(info: os.waitid_result | None) -> int | None:
    """An exit status as asyncio gives it: the code, or minus the signal that killed the process."""
    if info is None:
        return None
    killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
    return -info.si_status if killed else info.si_status


async def _cloned_vmm(launcher: asyncio.subprocess.Process, report: int) -> _Adopted | None:
    """The VMM the launcher cloned into a PID namespace of its own (None if the launcher failed
    first): it writes the pid to `report` and exits at once. Waited for even if the start is
    cancelled meanwhile, so that a VMM it did make is killed, not left running unwatched."""
    exited = asyncio.ensure_future(launcher.wait())
    try:
        await asyncio.shield(exited)
    except asyncio.CancelledError:
        await exited
        pid = _reported_pid(report)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # our child, killed: reaped at once
        raise
    pid = _reported_pid(report)
    return _Adopted(pid, reap=True) if pid is not None else None


def _reported_pid(report: int) -> int | None:
    try:
        return int(os.read(report, 32) or b"0") or None
    except (BlockingIOError, ValueError):
        return None


def console_tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 16384))
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def exit_reason(console: str, shutdown: dict[str, Any] | None, returncode: int | None) -> str:
    """Turn how QEMU ended into a sentence an operator can act on."""
    lines = console.splitlines()
    for line in lines:
        if "Kernel panic" in line:
            return "guest kernel panicked: " + line.split("Kernel panic", 1)[1].lstrip(" -")
    agent_lines = [ln.strip() for ln in lines if "tartarus-agent:" in ln]
    detail = f" ({agent_lines[-1]})" if agent_lines else ""
    if shutdown is not None:
        reason = str(shutdown.get("reason", "unknown"))
        if reason.startswith("host-"):
            return "VM stopped by the host"
        what = {"guest-shutdown": "guest powered off", "guest-reset": "guest rebooted"}.get(reason)
        return (what or f"VM shut down ({reason})") + detail
    if returncode is not None and returncode < 0:
        return f"VMM process killed by signal {signal.Signals(-returncode).name}"
    if returncode is None:  # a VMM adopted from an earlier daemon: its status went to init
        return f"VMM process exited{detail}"
    return f"VMM process exited with status {returncode}{detail}"


class MicroVM:
    """A running (or paused) QEMU microVM with its QMP connection and guest agent client."""

    def __init__(self, config: VMConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir  # QEMU's sockets and pid file (its jail's mount point, if jailed)
        self.process: asyncio.subprocess.Process | _Adopted | None = None  # QEMU (never the launcher)
        self.qmp: QMPClient | None = None
        self.agent: AgentClient | None = None
        self.exit_message: str | None = None
        self._shutdown_event: dict[str, Any] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._exited = asyncio.Event()
        self._shutdown_seen = asyncio.Event()
        self.on_exit: Callable[[MicroVM], None] | None = None
        self.timings: dict[str, float] = {}
        self._drive_nodes: dict[int, str] = {}  # drives whose file was replaced: their new node

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self, *, nice: int = 0) -> None:
        """Spawn QEMU and connect QMP and the agent channel (the guest may still be booting).

        `nice` > 0 starts it at low priority (a pool's spare VMM must not slow live sandboxes); see
        `set_priority` for raising it again when the VMM is put to use.
        """
        t0 = time.perf_counter()
        qmp_vm = _listen(self.workdir / QMP_SOCKET)
        agent_vm = _listen(self.workdir / AGENT_SOCKET)
        qmp_host = agent_host = None
        stderr = open(self.workdir / "qemu.log", "ab", opener=private.opener)  # noqa: SIM115
        netns_fd = tap_fd = report = report_w = -1
        claim: jail.UidClaim | None = None
        try:
            # Connected before QEMU starts: the backlog holds them until it accepts.
            qmp_host = _connect(self.workdir / QMP_SOCKET)
            agent_host = _connect(self.workdir / AGENT_SOCKET)
            jail_spec = identity = None
            if self.config.jail:
                claim, jail_spec, identity = self._jail()
            if self.config.jail and self.config.tap is not None:
                tap_fd = os.open(os.devnull, os.O_RDONLY)  # a free number, which the launcher fills
            argv = command_line(
                self.config,
                qmp_fd=qmp_vm.fileno(),
                agent_fd=agent_vm.fileno(),
                tap_fd=tap_fd if tap_fd >= 0 else None,
            )
            if self.config.netns is not None:
                netns_fd = os.open(self.config.netns, os.O_RDONLY | os.O_CLOEXEC)
            if self.config.jail:  # the VMM alone in a PID namespace: the launcher reports its pid
                report, report_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            argv = launch_argv(
                argv,
                tie_to=None if self.config.outlive_owner else os.getpid(),
                nice=nice,
                huge_pages=huge_pages(self.config),
                netns_fd=netns_fd if netns_fd >= 0 else None,
                cgroup_procs=tuple(str(c / "cgroup.procs") for c in self.config.cgroups),
                tap=(self.config.tap, tap_fd) if tap_fd >= 0 and self.config.tap else None,
                pid_report_fd=report_w if report_w >= 0 else None,
                jail=jail_spec,
                identity=identity,
            )
            fds = [qmp_vm.fileno(), agent_vm.fileno()]
            fds += [fd for fd in (netns_fd, tap_fd, claim.fd if claim else -1, report_w) if fd >= 0]
            env = {**private.CHILD_ENV, **environment(self.config)}
            if self.config.jail:
                env.update(jail.environment(self.config))
            launcher = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                pass_fds=fds,
                umask=private.QEMU_UMASK,  # what QEMU makes in the sandbox's directory is private
                env=env,  # never the daemon's
            )
            if report < 0:
                self.process = launcher
            else:
                os.close(report_w)
                report_w = -1
                self.process = await _cloned_vmm(launcher, report)
                if self.process is None:
                    detail = (self.workdir / "qemu.log").read_text(errors="replace").strip()[-2000:]
                    raise SandboxFailed(f"VMM failed to start: {detail}")
        except BaseException:
            for sock in (qmp_host, agent_host):
                if sock is not None:
                    sock.close()
            raise
        finally:
            for fd in (netns_fd, tap_fd, report, report_w):
                if fd >= 0:
                    os.close(fd)
            if claim is not None:
                if self.process is not None:
                    claim.record(self.process.pid)
                claim.close()  # the VMM holds the uid now (its copy of the lock); if it never ran, freed
            stderr.close()
            qmp_vm.close()
            agent_vm.close()
        assert qmp_host is not None and agent_host is not None
        private.write_private(self.workdir / PID_FILE, str(self.process.pid))
        self._tasks.append(asyncio.create_task(self._watch_process(), name="vmm-watch"))
        try:
            self.qmp = _QMP()
            await self.qmp.connect(qmp_host)
            self.timings["vmm_ready"] = time.perf_counter() - t0
            self._tasks.append(asyncio.create_task(self._watch_events(), name="vmm-events"))
            reader, writer = await asyncio.open_unix_connection(sock=agent_host, limit=1 << 21)
            self.agent = AgentClient(reader, writer, eof_reason=self._eof_reason)
        except Exception as e:
            await self.kill()
            detail = (self.workdir / "qemu.log").read_text(errors="replace").strip()[-2000:]
            raise SandboxFailed(f"VMM failed to start: {detail or e}") from e
        except BaseException:
            await self.kill()
            raise

    def _jail(self) -> tuple[jail.UidClaim, JailSpec, Identity]:
        """Claim a uid for this VMM, hand it its files and say what its jail holds."""
        uids = jail.uid_range()
        claim = jail.claim_uid(uids)
        try:
            self.config.uid = claim.uid
            jail.prepare_files(self.config, claim.uid, uids)
            root = self.workdir / jail.JAIL_DIR
            root.mkdir(mode=private.PRIVATE_DIR, exist_ok=True)
            seen = jail.view(self.config)
            spec = JailSpec(root, seen.read_only, seen.writable, seen.links)
            groups = (uids.shared_gid, *jail.kvm_groups(self.config))
        except BaseException:
            claim.close()
            raise
        return claim, spec, Identity(claim.uid, claim.uid, groups)

    @classmethod
    async def attach(
        cls, config: VMConfig, workdir: Path, pid: int, *, drive_nodes: dict[int, str] | None = None
    ) -> MicroVM:
        """Reconnect to a VMM that an earlier daemon started and that outlived it.

        The agent channel is resynchronised (`AgentClient.resync`): what the dead daemon left half-read
        is skipped, and requests it had in flight are gone (the agent killed their commands)."""
        if not is_our_vmm(pid, workdir):
            raise SandboxFailed(f"no VMM of {workdir.name} runs as pid {pid}")
        vm = cls(config, workdir)
        vm._drive_nodes = dict(drive_nodes or {})
        vm.process = _Adopted(pid)
        vm._tasks.append(asyncio.create_task(vm._watch_process(), name="vmm-watch"))
        try:
            vm.qmp = _QMP()
            await asyncio.wait_for(vm.qmp.connect(_connect(workdir / QMP_SOCKET)), 10)
            vm._tasks.append(asyncio.create_task(vm._watch_events(), name="vmm-events"))
            status = await vm.qmp_execute("query-status")
            state = status.get("status") if isinstance(status, dict) else None
            if state in ("paused", "postmigrate"):
                await vm.resume()  # the daemon died between a pause and its resume (hibernate, fork)
            elif state != "running":
                raise SandboxFailed(f"VMM of {workdir.name} is in state {state!r}")
            reader, writer = await asyncio.open_unix_connection(
                sock=_connect(workdir / AGENT_SOCKET), limit=1 << 21
            )
            vm.agent = AgentClient(reader, writer, eof_reason=vm._eof_reason, resync=True)
            await vm.agent.resync(timeout=10)
        except BaseException:
            await vm._cleanup(keep_pid_file=True)
            raise
        return vm

    @property
    def drive_nodes(self) -> dict[int, str]:
        """Drives whose file was replaced (`replace_drive`), by index: their current block node."""
        return dict(self._drive_nodes)

    def set_priority(self, nice: int = 0) -> None:
        """Renice every QEMU thread (niceness is per thread on Linux)."""
        if self.pid is None:
            return
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)

    def agent_client(self) -> AgentClient:
        if self.agent is None or self._exited.is_set():
            raise SandboxFailed(self.exit_message or "VM has no agent connection")
        return self.agent

    async def wait_agent(self, timeout: float) -> None:
        """Wait for the agent's HELLO; fail fast (with the reason) if the VM dies meanwhile."""
        assert self.agent is not None
        try:
            await asyncio.wait_for(self.agent.wait_hello(), timeout)
        except TimeoutError:
            tail = console_tail(self.config.console_log)
            raise Timeout(f"guest agent did not start within {timeout:.0f} s; console:\n{tail}") from None

    async def qmp_execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        if self.qmp is None or self._exited.is_set():
            raise SandboxFailed(self.exit_message or "VM is not running")
        return await self.qmp.execute(cmd, args)

    async def _give_fd(self, fd: int, name: str) -> None:
        """Hand QEMU an open file or pipe over the QMP socket (SCM_RIGHTS) instead of a path it opens."""
        assert self.qmp is not None
        self.qmp.send_fd_scm(fd)
        await self.qmp_execute("getfd", {"fdname": name})

    async def _migrate(self, command: str, uri: str, what: str, timeout: float) -> None:
        """Run a migration command and wait for its MIGRATION event to say completed (or failed)."""
        assert self.qmp is not None
        caps = [{"capability": c, "state": True} for c in ("x-ignore-shared", "events")]
        await self.qmp_execute("migrate-set-capabilities", {"capabilities": caps})
        listener = EventListener(names=["MIGRATION"])
        with self.qmp.listen(listener):
            await self.qmp_execute(command, {"uri": uri})
            try:
                async with asyncio.timeout(timeout):
                    while True:
                        data = (await listener.get())["data"]
                        status = data.get("status") if isinstance(data, dict) else None
                        if status == "completed":
                            return
                        if status in ("failed", "cancelled"):
                            break
            except TimeoutError:
                raise Timeout(f"{what} did not complete within {timeout:.0f} s") from None
        info = await self.qmp_execute("query-migrate")
        detail = info.get("error-desc", "failed") if isinstance(info, dict) else "failed"
        raise SandboxFailed(f"{what} failed: {detail}")

    async def save_state(self, path: Path, timeout: float = 60.0) -> None:
        """Pause and write the device state to `path`. Guest RAM in a shared memory file is not in it
        (`x-ignore-shared`), which is what makes a snapshot cheap to take and to map; RAM mapped
        privately is, page by page (hibernation filters it, see tartarus.hibernation.stream)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await self.save_state_to(fd, timeout)
        finally:
            os.close(fd)

    async def save_state_to(self, fd: int, timeout: float = 60.0) -> None:
        """Pause and write the migration stream to `fd`: a file, or a pipe someone is reading."""
        await self.pause()
        # The default cap (128 MiB/s) is for live migration over a network, not for a local file.
        await self.qmp_execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        await self._give_fd(fd, "snapshot")
        await self._migrate("migrate", "fd:snapshot", "saving VM state", timeout)

    async def save_device_state(self) -> bytes:
        """The paused VM's device state without its RAM: QEMU's `xen-save-devices-state` (generic, despite
        its name), a migration stream of the device sections only, tens of KB. The VM stays paused."""
        memfd = os.memfd_create("device-state", os.MFD_CLOEXEC)
        try:
            wfd = os.open(f"/proc/self/fd/{memfd}", os.O_WRONLY | os.O_CLOEXEC)  # QEMU wants write-only
            try:
                assert self.qmp is not None
                self.qmp.send_fd_scm(wfd)
                await self.qmp_execute("add-fd", {"fdset-id": DEVICE_FDSET})
            finally:
                os.close(wfd)
            try:
                await self.qmp_execute(
                    "xen-save-devices-state", {"filename": f"/dev/fdset/{DEVICE_FDSET}", "live": False}
                )
            finally:
                with contextlib.suppress(Exception):
                    await self.qmp_execute("remove-fd", {"fdset-id": DEVICE_FDSET})
            return os.pread(memfd, os.fstat(memfd).st_size, 0)
        finally:
            os.close(memfd)

    async def load_state(self, path: Path, timeout: float = 60.0, *, offset: int = 0) -> None:
        """Load device state (the stream in `path` from `offset`) into a VMM started with
        `incoming=True`; the VM stays paused."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            await self._give_fd(fd, "snapshot")
        finally:
            os.close(fd)
        await self._migrate("migrate-incoming", "fd:snapshot", "loading VM state", timeout)

    async def replace_drive(self, index: int, path: Path) -> None:
        """Point drive `index` at another file before the guest runs, e.g. a pre-started VMM (waiting
        for incoming state) taking on a hibernated sandbox's writable layer. QEMU opens the new file,
        switches the device's format node to it, and closes the old one."""
        drive = self.config.drives[index]
        node = f"{file_node(index)}-{path.stat().st_ino}"
        old = self._drive_nodes.get(index, file_node(index))
        await self.qmp_execute(
            "blockdev-add",
            {
                "driver": "file",
                "node-name": node,
                "filename": await self._file_for_qemu(path, drive.read_only),
                "read-only": drive.read_only,
                "cache": {"direct": False},
            },
        )
        await self.qmp_execute(
            "blockdev-reopen",
            {
                "options": [
                    {
                        "driver": drive.format,
                        "node-name": disk_node(index),
                        "file": node,
                        "read-only": drive.read_only,
                    }
                ]
            },
        )
        await self.qmp_execute("blockdev-del", {"node-name": old})
        self._drive_nodes[index] = node
        self.config.drives[index] = dataclasses.replace(drive, path=path)

    async def _file_for_qemu(self, path: Path, read_only: bool) -> str:
        """`path` as QEMU may open it: a jailed VMM cannot reach host paths, so it is given the file,
        open, in an fd set (and made its own if writable); a QEMU with the host's view gets the path."""
        if not self.config.jail:
            return str(path)
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        try:
            if not read_only and self.config.uid is not None:
                os.fchown(fd, self.config.uid, self.config.uid)
            assert self.qmp is not None
            self.qmp.send_fd_scm(fd)
            added = await self.qmp_execute("add-fd")
        finally:
            os.close(fd)
        return f"/dev/fdset/{added['fdset-id']}"

    async def pause(self) -> None:
        await self.qmp_execute("stop")

    async def resume(self) -> None:
        await self.qmp_execute("cont")

    async def quit(self, timeout: float = 5.0) -> None:
        """Ask QEMU to exit; kill it if it does not within `timeout`."""
        if self.process is None or self._exited.is_set():
            await self._cleanup()
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.qmp_execute("quit"), timeout)
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except TimeoutError:
            await self.kill()
        await self._cleanup()

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        await self._cleanup()

    async def detach(self) -> None:
        """Let go of a VMM that outlives us (a daemon shutting down and leaving it to the next one)."""
        await self._cleanup(keep_pid_file=True)

    async def wait(self) -> None:
        await self._exited.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and not self._exited.is_set()

    async def _cleanup(self, *, keep_pid_file: bool = False) -> None:
        if self.agent is not None:
            await self.agent.close()
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for task in self._tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._tasks.clear()
        if not keep_pid_file:
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / PID_FILE).unlink()

    async def _watch_process(self) -> None:
        assert self.process is not None
        returncode = await self.process.wait()
        # QEMU sends SHUTDOWN just before exiting; give the event reader a moment to deliver it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._shutdown_seen.wait(), 0.2)
        self.exit_message = exit_reason(
            console_tail(self.config.console_log, 60), self._shutdown_event, returncode
        )
        self._exited.set()
        if self.agent is not None:
            self.agent.fail(SandboxFailed(self.exit_message))
        if self.on_exit is not None:
            self.on_exit(self)

    async def _eof_reason(self) -> str:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._exited.wait(), 5)
        return self.exit_message or "guest agent channel closed while the VMM still runs"

    def _agent_port_closed(self) -> None:
        if self.agent is not None:
            log.warning("guest agent closed its port (vm pid %s)", self.pid)
            self.agent.agent_restarted("guest agent exited; it is being restarted by init")

    async def _watch_events(self) -> None:
        assert self.qmp is not None
        with self.qmp.listener() as listener:
            async for event in listener:
                name = event["event"]
                log.debug("QMP event %s", event)
                raw = event.get("data")
                data: dict[str, Any] = raw if isinstance(raw, dict) else {}
                if name == "SHUTDOWN":
                    self._shutdown_event = data
                    self._shutdown_seen.set()
                elif name == "VSERPORT_CHANGE" and data.get("id") == "agent0" and not data.get("open"):
                    self._agent_port_closed()


__all__ = ["AGENT_PORT", "MicroVM", "exit_reason"]
