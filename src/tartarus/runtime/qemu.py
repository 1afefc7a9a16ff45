"""QEMU `microvm` command lines.

Pure functions: what a VM looks like to QEMU. The same line runs under KVM in production and TCG on
hosts without usable hardware virtualisation; only `-accel` and `-cpu` differ.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tartarus.errors import SetupRequired
from tartarus.runtime.ramfile import native_read_only

AGENT_PORT = "org.tartarus.agent.0"
# The guest RAM backend's id, which is also its RAM block's name in migration streams.
RAM_BLOCK = "ram"


def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise SetupRequired("qemu-system-x86_64 is not installed: run ./scripts/setup")
    return path


@dataclass(frozen=True)
class Drive:
    path: Path
    read_only: bool
    format: str = "raw"


def file_node(index: int) -> str:
    """The block node of drive `index`'s file (what `MicroVM.replace_drive` swaps)."""
    return f"file{index}"


def disk_node(index: int) -> str:
    """The format node of drive `index`, which the guest's virtio-blk device is attached to."""
    return f"disk{index}"


def block_device(index: int) -> str:
    """The qdev id of drive `index`'s virtio-blk device (what block throttling is set on)."""
    return f"vd{index}"


@dataclass
class VMConfig:
    """Everything QEMU needs to start one microVM."""

    kernel: Path
    initrd: Path
    drives: list[Drive]
    accel: str  # "kvm" or "tcg"
    vcpus: int = 1
    memory_mib: int = 512
    kernel_args: list[str] = field(default_factory=list)
    console_log: Path | None = None
    # File-backed guest RAM (for snapshots): shared so that a snapshot's RAM is this file.
    memory_file: Path | None = None
    memory_share: bool = True
    incoming: bool = False  # start waiting for migration state (snapshot restore)
    # QEMU user networking (NAT through the host), for template build VMs only.
    user_net: bool = False
    # A sandbox's NIC: a TAP (by name) inside the network namespace the VMM is started in.
    tap: str | None = None
    guest_mac: str = "52:54:00:00:00:02"
    netns: Path | None = None  # started inside this namespace (not part of the command line)
    cgroups: list[Path] = field(default_factory=list)  # joined before exec (not part of the command line)
    # The VMM survives the process that starts it (a daemon's: the next daemon takes it over) instead of
    # dying with it (not part of the command line).
    outlive_owner: bool = False
    # Started unprivileged in a filesystem view of its own (`tartarus.runtime.jail`), as `uid` (which
    # the start records, for a daemon taking it over to know). Neither is part of the command line.
    jail: bool = False
    uid: int | None = None


def kernel_cmdline(config: VMConfig) -> str:
    base = [
        "console=ttyS0",
        "quiet",
        "panic=-1",  # reboot on panic, which -no-reboot turns into QEMU exiting
        "reboot=t",
        "rdinit=/init",
        "i8042.noaux",
        "i8042.nokbd",
        "tsc=reliable",
        "random.trust_cpu=on",
    ]
    return " ".join(base + config.kernel_args)


def boot_files(config: VMConfig) -> list[str]:
    """The kernel, initramfs and command line a booting VM starts from. A VM waiting for incoming
    state never boots, so it gets none: QEMU would keep the kernel in its heap for the VM's life (3.2
    MiB per idle sandbox, of ~28) only to boot it again on a reset, which `-no-reboot` turns into an
    exit anyway."""
    if config.incoming:
        return []
    return ["-kernel", str(config.kernel), "-initrd", str(config.initrd), "-append", kernel_cmdline(config)]


def huge_pages(config: VMConfig) -> bool:
    """Whether the VMM may use transparent huge pages. Not under TCG: it asks for them on its
    translation buffer, so an idle sandbox's ~9 MiB of translated code held 10 MiB in whole 2 MiB
    pages, 1.4 MiB more than in 4 KiB ones, for no measurable speed (create -> run_code and a numpy
    and pandas run_code, n=2 each, alike). Under KVM they back guest RAM where it is anonymous."""
    return config.accel != "tcg"


def environment(config: VMConfig) -> dict[str, str]:
    """What the VMM's environment adds. Single-threaded TCG: one malloc arena, not one per thread that
    allocates (0.3 MiB less per idle sandbox, create -> run_code and compute alike, n=4 each); KVM
    and multi-threaded TCG keep theirs, their vCPU threads allocating at once."""
    return {"MALLOC_ARENA_MAX": "1"} if config.accel == "tcg" and config.vcpus == 1 else {}


# The TCG guest CPU: qemu64 raised to x86-64-v2 (qemu64 has CX16, LAHF and SSE3 already), the baseline of
# current PyPI wheels (numpy 2.4 dies of SIGILL without SSSE3/SSE4.1/SSE4.2/POPCNT). QEMU 7.2's TCG
# implements all four; it stays below AVX, whose paths TCG runs slower than SSE ones (see below).
TCG_CPU = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt"


def command_line(config: VMConfig, *, qmp_fd: int, agent_fd: int, tap_fd: int | None = None) -> list[str]:
    """Build argv; QMP and the agent channel arrive as listening unix sockets (fds the caller bound
    and already connected to, so no race with QEMU's start-up). QEMU listens again when its client
    goes, which is what lets a restarted daemon reconnect to a VM it did not start. `tap_fd` is the
    TAP already opened (a jailed VMM may not open /dev/net/tun); without it QEMU opens `config.tap`."""
    if config.accel == "kvm":
        accel = ["-accel", "kvm", "-cpu", "host"]
    elif config.accel == "tcg":
        # qemu64 rather than max: guest code then takes SSE paths that TCG runs faster than AVX ones
        # (cold-start P50 89.6 vs 97.1 ms, n=60 each). One vCPU runs best on single-threaded TCG
        # (P50 76.6/74.9 vs 82.6/79.5 ms in alternating runs, n=60 each); more need MTTCG.
        thread = "single" if config.vcpus == 1 else "multi"
        accel = ["-accel", f"tcg,thread={thread},tb-size=128", "-cpu", TCG_CPU]
    else:
        raise ValueError(f"unknown accelerator {config.accel!r}")
    machine = "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off,pcie=off,pic=on,pit=on"
    argv = [
        qemu_binary(),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        *accel,
        "-smp",
        str(config.vcpus),
    ]
    if config.memory_file is not None:
        share = "on" if config.memory_share else "off"
        backend = (
            f"memory-backend-file,id={RAM_BLOCK},size={config.memory_mib}M,mem-path={config.memory_file}"
        )
        # A private mapping never writes its file: open it read-only where QEMU can say so (>= 8.2)
        if not config.memory_share and native_read_only(argv[0]):
            backend += ",readonly=on,rom=off"
        argv += [
            "-object",
            f"{backend},share={share}",
            "-M",
            f"{machine},memory-backend={RAM_BLOCK}",
            "-m",
            f"{config.memory_mib}M",
        ]
    else:
        argv += ["-M", machine, "-m", f"{config.memory_mib}M"]
    argv += boot_files(config)
    argv += [
        "-chardev",
        f"socket,id=qmp,fd={qmp_fd},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"file,id=console,path={config.console_log or '/dev/null'}",
        "-serial",
        "chardev:console",
        "-device",
        "virtio-rng-device",
        "-device",
        "virtio-serial-device,max_ports=2",
        "-chardev",
        f"socket,id=agent,fd={agent_fd},server=on,wait=off",
        "-device",
        f"virtserialport,chardev=agent,name={AGENT_PORT},id=agent0",
    ]
    for i, drive in enumerate(config.drives):
        ro = "on" if drive.read_only else "off"
        argv += [
            "-blockdev",
            f"driver=file,filename={drive.path},node-name={file_node(i)},read-only={ro},cache.direct=off",
            "-blockdev",
            f"driver={drive.format},file={file_node(i)},node-name={disk_node(i)},read-only={ro}",
            "-device",
            f"virtio-blk-device,drive={disk_node(i)},id={block_device(i)}",
        ]
    if config.user_net:
        argv += ["-netdev", "user,id=net0", "-device", "virtio-net-device,netdev=net0"]
    if config.tap is not None:
        tap = f"fd={tap_fd}" if tap_fd is not None else f"ifname={config.tap},script=no,downscript=no"
        argv += [
            "-netdev",
            f"tap,id=net1,{tap},vhost=off",
            "-device",
            f"virtio-net-device,netdev=net1,mac={config.guest_mac}",
        ]
    if config.incoming:
        # -S: the guest never starts by itself after the load, whatever run state the stream records (a
        # hibernation's device state says "running"): a wake commits between its load and its resume.
        argv += ["-S", "-incoming", "defer"]
    return argv
