"""What confines a running sandbox's VMM process itself, read from the kernel's view of that process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartarus.runtime import jail
from tartarus.sdk import Sandbox
from tests.conftest import qemu_pids, wait_until
from tests.served import Served

HOST_SECRET = Path("/etc/shadow")


def confinement(pid: int) -> tuple[str, str]:
    """(Seccomp, NoNewPrivs) from `/proc/<pid>/status`."""
    status = _status(pid)
    return status["Seccomp"], status["NoNewPrivs"]


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _workdir(pid: int) -> Path:
    """The sandbox directory a VMM was started for (its console log's)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    (console,) = [a for a in argv if a.startswith("file,id=console,path=")]
    return Path(console.removeprefix("file,id=console,path=")).parent


def _jail_files(pid: int) -> set[Path]:
    """Everything in the VMM's root but the system files (/usr) and device nodes."""
    root = f"/proc/{pid}/root"
    found = set()
    for parent, dirs, files in os.walk(root):
        rel = Path("/") / os.path.relpath(parent, root)
        if rel == Path("/"):
            dirs[:] = [d for d in dirs if d not in ("usr", "dev")]
        found |= {rel / name for name in [*dirs, *files]}
    return found


def _opens_as(status: dict[str, str], paths: list[Path]) -> list[Path]:
    """Which of `paths` a process with `status`'s uid, gid and groups can open for reading."""
    uid, gid = status["Uid"].split()[0], status["Gid"].split()[0]
    groups = status["Groups"].split()
    opened = []
    for path in paths:
        line = ["setpriv", f"--reuid={uid}", f"--regid={gid}"]
        line += [f"--groups={','.join(groups)}" if groups else "--clear-groups", "--"]
        if subprocess.run([*line, "head", "-c0", str(path)], capture_output=True).returncode == 0:
            opened.append(path)
    return opened


def _memory_file(pid: int) -> Path:
    """The template memory file behind a VMM's guest RAM (a restored or woken sandbox's, a spare's)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    (backend,) = [a for a in argv if a.startswith("memory-backend-file,")]
    (path,) = [o.removeprefix("mem-path=") for o in backend.split(",") if o.startswith("mem-path=")]
    return Path(path)


def _writable_in_jail_as(pid: int, status: dict[str, str], path: Path) -> bool:
    """Whether a process of `status`'s uid, gid and groups opens `path` for writing as the VMM `pid`
    sees it: through its root, so the jail's bind mount and the file's own mode both decide."""
    uid, gid = status["Uid"].split()[0], status["Gid"].split()[0]
    groups = status["Groups"].split()
    line = ["setpriv", f"--reuid={uid}", f"--regid={gid}"]
    line += [f"--groups={','.join(groups)}" if groups else "--clear-groups", "--"]
    probe = "import os, sys; os.close(os.open(sys.argv[1], os.O_WRONLY))"  # no O_TRUNC: changes nothing
    jailed = f"/proc/{pid}/root{path}"
    return (
        subprocess.run([*line, "/usr/bin/python3", "-c", probe, jailed], capture_output=True).returncode == 0
    )


def check_read_only_memory(pid: int) -> None:
    """The VMM's template memory file: root's, no write bit for its group or others, bind-mounted
    read-only in its jail, open in QEMU read-only behind a private mapping; and as the VMM's uid it
    does not open for writing, while the VMM's own console log does (so the probe can succeed)."""
    memory = _memory_file(pid)
    st = memory.stat()
    assert st.st_uid == 0 and st.st_mode & 0o022 == 0, oct(st.st_mode)
    (mount,) = [
        m.split()
        for m in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        if m.split()[4] == str(memory)
    ]
    assert "ro" in mount[5].split(",")
    fds = [fd for fd in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{fd}") == str(memory)]
    flags = [int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8) for fd in fds]
    assert flags and all(f & os.O_ACCMODE == os.O_RDONLY for f in flags)
    maps = [m for m in Path(f"/proc/{pid}/maps").read_text().splitlines() if m.endswith(str(memory))]
    assert maps and all(m.split()[1] == "rw-p" for m in maps)  # guest RAM: writable, private
    status = _status(pid)
    assert _writable_in_jail_as(pid, status, _workdir(pid) / "console.log")
    assert not _writable_in_jail_as(pid, status, memory)


def check_pid_namespace(pid: int, others: list[int]) -> None:
    """The VMM is pid 1 of a PID namespace of its own, with an IPC namespace of its own; from inside
    it, as its uid, another VMM's pid names no process (it cannot be signalled), while the VMM itself
    (pid 1 there) can be."""
    status = _status(pid)
    assert status["NSpid"].split() == [str(pid), "1"]
    for ns in ("pid", "ipc"):  # and System V IPC and message queues of its own
        theirs = {os.readlink(f"/proc/{p}/ns/{ns}") for p in [*others, os.getpid()]}
        assert os.readlink(f"/proc/{pid}/ns/{ns}") not in theirs
    uid, gid = status["Uid"].split()[0], status["Gid"].split()[0]
    probe = (
        "import os, sys\n"
        "for pid in map(int, sys.argv[1:]):\n"
        "    try:\n        os.kill(pid, 0)\n        print('signalled')\n"
        "    except ProcessLookupError:\n        print('no such process')\n"
    )
    line = [
        "nsenter",
        f"--target={pid}",
        "--pid",
        "--",
        "setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
    ]
    out = subprocess.run(
        [*line, "/usr/bin/python3", "-c", probe, "1", *map(str, others)], capture_output=True, text=True
    )
    assert out.stdout.splitlines() == ["signalled"] + ["no such process"] * len(others), out.stderr


def _started(pid: int) -> bool:
    """Past the launcher and QEMU's first steps (a pool's spare may be starting while a test looks):
    QEMU itself, its seccomp filter installed (what a VMM that never installs one never gets to)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        return argv0.endswith(b"qemu-system-x86_64") and _status(pid)["Seccomp"] == "2"
    except OSError:
        return True  # gone: the next look will not see it


def check_jailed(state: Path, secrets: tuple[Path, ...] = ()) -> dict[int, int]:
    """Every VMM of the daemon at `state` (sandboxes and pooled spares): a uid and gid of its own, no
    capability, no_new_privs and its seccomp filter; a root holding nothing of another VMM's directory
    nor of the daemon's; and, as its uid, no other VMM's layer or console log, nor `secrets`, opens.
    Returns each VMM's uid by pid."""
    pids: set[int] = set()

    def settled() -> bool:
        nonlocal pids
        pids = qemu_pids(state)
        return all(map(_started, pids))

    assert wait_until(settled, timeout=10)
    assert pids
    uids: dict[int, int] = {}
    gids = set()
    for pid in pids:
        status = _status(pid)
        (uid,) = set(status["Uid"].split())
        (gid,) = set(status["Gid"].split())
        assert uid != "0" and gid != "0"
        uids[pid] = int(uid)
        gids.add(gid)
        assert {status[c] for c in ("CapEff", "CapPrm", "CapBnd", "CapAmb")} == {"0" * 16}
        assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2")
    assert len(set(uids.values())) == len(gids) == len(pids), "a uid or gid shared by two VMMs"
    for pid in pids:
        own = _workdir(pid)
        others = [_workdir(p) for p in pids if p != pid]
        seen = _jail_files(pid)
        assert own / "layer.ext4" in seen or own / "console.log" in seen
        assert not [p for p in seen if any(p.is_relative_to(o) for o in others)]
        assert not [p for p in seen if p.is_relative_to("/etc") or p.name in ("sandbox.json", "admin.key")]
        forbidden = [f for o in others for f in (o / "layer.ext4", o / "console.log") if f.exists()]
        forbidden += [state / "admin.key", HOST_SECRET, *secrets]
        assert all(f.exists() for f in forbidden)
        status = _status(pid)
        assert _opens_as(status, [Path("/usr/bin/true")]) == [Path("/usr/bin/true")]  # the probe works
        assert _opens_as(status, forbidden) == []
        check_read_only_memory(pid)
        check_pid_namespace(pid, [p for p in pids if p != pid])
    assert "tartarus-jail" not in Path("/proc/self/mountinfo").read_text()  # in the VMMs' namespaces only
    return uids


def test_qemu_runs_under_its_seccomp_filter_with_no_new_privileges(
    daemon_url: str, daemon_state: Path
) -> None:
    """`-sandbox on,...` is in force (mode 2: a filter) on a pooled VMM taken by a create, on the spare
    the pool starts next and on the VMMs a wake starts; QEMU sets no_new_privs to install it."""
    with Sandbox.create("python-ds", url=daemon_url) as sb:
        (pid,) = qemu_pids(daemon_state / "sandboxes" / sb.id)
        assert confinement(pid) == ("2", "1")
        sb.hibernate()
        assert not qemu_pids(daemon_state / "sandboxes" / sb.id)
        assert sb.wake().state == "running"
        after = qemu_pids(daemon_state)  # the woken sandbox's VMM (in a pooled VMM's directory) and spares
        assert after and {p: confinement(p) for p in after} == {p: ("2", "1") for p in after}
        assert sb.commands.run("echo alive").stdout == "alive\n"


def test_each_vmm_is_jailed_as_its_own_uid_through_wake_and_fork(daemon_url: str, daemon_state: Path) -> None:
    """Two sandboxes, a hibernated one woken and a fork: every VMM unprivileged, alone in its view, and
    its uid free again (its claim gone) once its sandbox is destroyed."""
    with Sandbox.create("python-ds", url=daemon_url) as a, Sandbox.create("python-ds", url=daemon_url) as b:
        check_jailed(daemon_state)
        b.commands.run("echo secret > /root/mine")
        b.hibernate()
        saved = tuple(p for p in (daemon_state / "hibernated" / b.id).iterdir() if p.is_file())
        assert saved
        check_jailed(daemon_state, saved)
        assert b.wake().state == "running"
        uids = check_jailed(daemon_state)
        assert b.files.read_text("/root/mine") == "secret\n"
        (fork,) = a.fork(1)
        try:
            check_jailed(daemon_state)
            assert fork.commands.run("echo forked").stdout == "forked\n"
        finally:
            fork.kill()
    gone = set(uids.values()) - set(check_jailed(daemon_state).values())  # the spares stay
    assert gone and not [u for u in gone if jail.is_claimed(u)]


def test_a_process_in_the_vmms_network_namespace_sends_nothing_out_of_its_uplink(
    daemon_url: str, daemon_state: Path
) -> None:
    """What an escaped VMM would send itself (not forwarded from the guest, so the egress policy never
    sees it) is refused at its namespace's output: a datagram to an outside address fails with EPERM,
    while one to its own guest leaves (so the probe can succeed)."""
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for address in sys.argv[1:]:\n"
        "    try:\n        s.sendto(b'x', (address, 9))\n        print('sent')\n"
        "    except PermissionError:\n        print('refused')\n"
    )
    with Sandbox.create("python-ds", url=daemon_url) as sb:
        (pid,) = qemu_pids(daemon_state / "sandboxes" / sb.id)
        uid = _status(pid)["Uid"].split()[0]
        line = ["nsenter", f"--net=/proc/{pid}/ns/net", "setpriv", f"--reuid={uid}", f"--regid={uid}"]
        line += ["--clear-groups", "/usr/bin/python3", "-c", probe, "203.0.113.80", "198.18.0.2"]
        out = subprocess.run(line, capture_output=True, text=True)
        assert out.stdout.splitlines() == ["refused", "sent"], out.stderr
        assert sb.commands.run("echo alive").stdout == "alive\n"


@pytest.fixture
def served() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for daemon in started:
        daemon.stop(signal.SIGKILL)


def test_a_restarted_daemon_takes_over_jailed_vmms(tmp_path: Path, served: list[Served]) -> None:
    """After a `kill -9` of its daemon, a VMM keeps its uid (its claim is its own), the descriptor says
    which, and the next daemon serves the sandbox as it is; its destroy frees the uid and leaves no VMM
    or mount."""
    state = tmp_path / "state"
    first = Served(state)
    served.append(first)
    sb = Sandbox.create("python-ds", url=first.url, api_key=first.key)
    (pid,) = qemu_pids(state / "sandboxes" / sb.id)
    (uid,) = check_jailed(state).values()
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert jail.is_claimed(uid) and qemu_pids(state) == {pid}
    described = json.loads((state / "sandboxes" / sb.id / "sandbox.json").read_text())
    assert described["vm"]["config"]["uid"] == uid
    second = Served(state)
    served.append(second)
    again = Sandbox.connect(sb.id, url=second.url, api_key=second.key)
    assert again.commands.run("echo taken").stdout == "taken\n"
    assert check_jailed(state) == {pid: uid}
    again.kill()
    assert wait_until(lambda: not qemu_pids(state), timeout=30)
    assert not jail.is_claimed(uid)
