from __future__ import annotations

from tartarus.runtime.vm import exit_reason


def test_panic_wins() -> None:
    console = "boot...\n[    1.2] Kernel panic - not syncing: sysrq triggered crash\n"
    assert exit_reason(console, {"reason": "guest-reset"}, 0) == (
        "guest kernel panicked: not syncing: sysrq triggered crash"
    )


def test_agent_message_is_carried() -> None:
    console = "tartarus-agent: mount /dev/vda on /mnt/base (erofs): Invalid argument\n"
    msg = exit_reason(console, {"reason": "guest-reset"}, 0)
    assert msg.startswith("guest rebooted") and "mount /dev/vda" in msg


def test_killed_vmm() -> None:
    assert exit_reason("", None, -9) == "VMM process killed by signal SIGKILL"


def test_host_quit() -> None:
    assert exit_reason("", {"reason": "host-qmp-quit"}, 0) == "VM stopped by the host"
