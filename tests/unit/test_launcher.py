"""The VMM launcher puts a process in its place before exec: niceness, session, tie, cgroups, jail, uid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tartarus.runtime.launcher import Identity, JailSpec, launch_argv, launcher_path
from tests.conftest import wait_until


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def test_nice_session_and_cgroup_file_then_exec(tmp_path: Path) -> None:
    procs = tmp_path / "cgroup.procs"  # a stand-in: the launcher writes "0" (itself) into it
    procs.write_text("")
    script = "import os; print(os.getpriority(os.PRIO_PROCESS, 0), os.getsid(0) == os.getpid())"
    argv = launch_argv([sys.executable, "-c", script], tie_to=None, nice=7, cgroup_procs=(str(procs),))
    out = _run(argv)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(os.getpriority(os.PRIO_PROCESS, 0) + 7), "True"]
    assert procs.read_text() == "0"


def test_no_thp_turns_transparent_huge_pages_off_in_what_it_execs() -> None:
    script = "print([ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('THP_enabled:')])"
    for huge, expected in ((True, "['1']"), (False, "['0']")):
        out = _run(launch_argv([sys.executable, "-c", script], tie_to=None, huge_pages=huge))
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == expected


@pytest.mark.parametrize("unprivileged", [False, True], ids=["as-is", "dropped-uid"])
def test_a_tied_process_dies_with_its_parent(tmp_path: Path, unprivileged: bool) -> None:
    """Also after dropping its uid (a change of credentials clears the tie, so it is made last)."""
    if unprivileged and os.geteuid() != 0:
        pytest.skip("dropping a uid needs root")
    identity = Identity(1_500_000_123, 1_500_000_123) if unprivileged else None
    pid_file = tmp_path / "pid"
    # A parent that starts a tied sleeper and is then killed: the sleeper must not outlive it.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys, time\n"
            f"argv = {launch_argv(['/bin/sleep', '600'], tie_to=0, identity=identity)!r}\n"
            "argv[argv.index('--tie') + 1] = str(os.getpid())\n"
            f"p = subprocess.Popen(argv)\nopen({str(pid_file)!r}, 'w').write(str(p.pid))\ntime.sleep(600)\n",
        ]
    )
    try:
        assert wait_until(lambda: pid_file.exists() and pid_file.read_text() != "", 10)
        sleeper = int(pid_file.read_text())
        assert wait_until(lambda: b"sleep" in Path(f"/proc/{sleeper}/cmdline").read_bytes(), 10)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert wait_until(lambda: not _alive(sleeper), 10), "the tied process outlived its parent"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_failures_exit_126_and_say_why(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "cgroup.procs"
    out = _run(launch_argv(["/bin/true"], tie_to=None, cgroup_procs=(str(missing),)))
    assert out.returncode == 126 and "joining cgroup" in out.stderr and str(missing) in out.stderr
    out = _run(launch_argv([str(tmp_path / "qemu-nowhere")], tie_to=None))
    assert out.returncode == 126 and "exec" in out.stderr
    out = _run([str(launcher_path()), "--nice", "x", "--", "/bin/true"])
    assert out.returncode == 126 and "usage" in out.stderr
    out = _run([str(launcher_path()), "--setsid"])  # no command
    assert out.returncode == 126
    started = time.monotonic()
    out = _run(launch_argv(["/bin/true"], tie_to=1))  # "tied" to a parent it does not have
    assert out.returncode == 126 and time.monotonic() - started < 10


def test_a_jail_holds_only_the_paths_given_and_its_process_no_privilege(tmp_path: Path) -> None:
    """The jail's root is the given host paths at their own paths (writable only where asked), the host
    root is gone from it, and the process runs as the uid given with no way back to root."""
    if os.geteuid() != 0:
        pytest.skip("a jail needs root to make")
    (tmp_path / "root").mkdir()
    ro, rw, other = tmp_path / "ro", tmp_path / "rw", tmp_path / "other"
    for f in (ro, rw, other):
        f.write_text("")
    os.chown(rw, 1_500_000_123, 1_500_000_123)
    script = (
        "import errno, os\n"
        "print(os.getresuid(), os.getresgid(), os.getgroups())\n"
        f"print(os.path.exists({str(other)!r}), os.path.exists('/etc/passwd'), os.path.exists({str(ro)!r}))\n"
        f"open({str(rw)!r}, 'w').write('written')\n"
        "for attempt in (lambda: open(" + repr(str(ro)) + ", 'w'), lambda: os.setuid(0)):\n"
        "    try:\n        attempt()\n    except OSError as e:\n        print(errno.errorcode[e.errno])\n"
    )
    links = tuple(Path(p) for p in ("/lib", "/lib64", "/bin") if os.path.islink(p))
    jail = JailSpec(tmp_path / "root", (Path("/usr"), ro), (rw,), links)
    argv = launch_argv(
        ["/usr/bin/python3", "-I", "-c", script],
        tie_to=None,
        jail=jail,
        identity=Identity(1_500_000_123, 1_500_000_124, (1_500_000_125,)),
    )
    out = _run(argv)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "(1500000123, 1500000123, 1500000123) (1500000124, 1500000124, 1500000124) [1500000125]",
        "False False True",
        "EROFS",
        "EPERM",
    ]
    assert rw.read_text() == "written"
    assert "tartarus-jail" not in Path("/proc/self/mountinfo").read_text()
    out = _run(launch_argv(["/bin/true"], tie_to=None, identity=Identity(0, 0)))
    assert out.returncode == 126 and "usage" in out.stderr  # never "drop" to root


def _pidns_launch(argv: list[str], **kwargs: object) -> tuple[subprocess.Popen[str], int]:
    """Start `argv` through the launcher in a PID namespace of its own; returns the launcher and the
    pid it reported."""
    report, report_w = os.pipe()
    try:
        line = launch_argv(argv, pid_report_fd=report_w, **kwargs)  # type: ignore[arg-type]
        launcher = subprocess.Popen(line, pass_fds=(report_w,), stdout=subprocess.PIPE, text=True)
        os.close(report_w)
        with os.fdopen(report, closefd=False) as f:
            pid = int(f.read())
    finally:
        os.close(report)
    return launcher, pid


def test_a_pid_namespace_makes_the_process_pid_1_alone_and_the_starters_child() -> None:
    """It sees itself as pid 1 with no parent, cannot signal a process outside (its pids mean nothing
    there), and is the starter's own child: the launcher exits at once, the starter reaps the process
    and reads its exit status."""
    if os.geteuid() != 0:
        pytest.skip("a PID namespace needs root to make")
    script = (
        "import os, sys\n"
        "print(os.getpid(), os.getppid())\n"
        "try:\n    os.kill(int(sys.argv[1]), 0)\nexcept ProcessLookupError:\n    print('not found')\n"
        "sys.exit(7)\n"
    )
    launcher, pid = _pidns_launch(["/usr/bin/python3", "-I", "-c", script, str(os.getpid())], tie_to=None)
    assert launcher.wait(timeout=30) == 0 and pid != launcher.pid
    _, status = os.waitpid(pid, 0)  # ours to reap: ChildProcessError were it anyone else's
    assert os.waitstatus_to_exitcode(status) == 7
    assert launcher.stdout is not None and launcher.stdout.read().splitlines() == ["1 0", "not found"]


def test_a_tied_process_in_a_pid_namespace_dies_with_its_parent(tmp_path: Path) -> None:
    """Its parent is outside its namespace (getppid() is 0 there): the tie still holds, as pid 1 too."""
    if os.geteuid() != 0:
        pytest.skip("a PID namespace needs root to make")
    pid_file = tmp_path / "pid"
    identity = Identity(1_500_000_123, 1_500_000_123)
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys, time\n"
            "r, w = os.pipe()\n"
            f"argv = {launch_argv(['/bin/sleep', '600'], tie_to=0, identity=identity, pid_report_fd=0)!r}\n"
            "argv[argv.index('--tie') + 1] = str(os.getpid())\n"
            "argv[argv.index('--pidns') + 1] = str(w)\n"
            "subprocess.Popen(argv, pass_fds=(w,)).wait()\n"
            f"open({str(pid_file)!r}, 'w').write(os.read(r, 32).decode().strip())\ntime.sleep(600)\n",
        ]
    )
    try:
        assert wait_until(lambda: pid_file.exists() and pid_file.read_text() != "", 10)
        sleeper = int(pid_file.read_text())
        assert wait_until(lambda: b"sleep" in Path(f"/proc/{sleeper}/cmdline").read_bytes(), 10)
        assert Path(f"/proc/{sleeper}/status").read_text().split("NSpid:")[1].split()[1] == "1"
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert wait_until(lambda: not _alive(sleeper), 10), "the tied process outlived its parent"
