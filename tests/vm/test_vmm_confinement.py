"""What confines a running sandbox's VMM process itself, read from the kernel's view of that process."""

from __future__ import annotations

from pathlib import Path

from tartarus.sdk import Sandbox
from tests.conftest import qemu_pids


def confinement(pid: int) -> tuple[str, str]:
    """(Seccomp, NoNewPrivs) from `/proc/<pid>/status`."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    status = {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status["Seccomp"], status["NoNewPrivs"]


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
