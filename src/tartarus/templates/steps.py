"""Run a template's build steps in a build VM and keep what they did as a new base image.

The build VM boots a private, grown copy of the base image as its root, read-write and without the
overlay (`tartarus.rw=none`), with QEMU user networking (`tartarus.net=`) so steps can download
packages. The steps' TLS clients trust the host's CA certificates for the build (a host behind an
intercepting egress proxy, as this project's machines are, re-signs PyPI with its own CA), through a
bundle copied in and removed afterwards. Whatever the steps leave is the new image: no layer capture or
merge is needed. Only the template author's steps run here, never sandbox code.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tartarus.bootfiles.initramfs import initramfs_path
from tartarus.bootfiles.kernel import kernel_path
from tartarus.errors import GuestError, InvalidArgument, SandboxFailed
from tartarus.runtime import jail
from tartarus.runtime.accel import choose_accel
from tartarus.runtime.agent import AgentClient, Output
from tartarus.runtime.disks import sparse_copy
from tartarus.runtime.qemu import Drive, VMConfig
from tartarus.runtime.vm import MicroVM
from tartarus.templates.built import Template

GUEST_NET = "10.0.2.15/24,10.0.2.2"  # QEMU user networking's defaults
GUEST_DNS = b"nameserver 10.0.2.3\n"
RESOLV = "/etc/resolv.conf"
HEADROOM_MIB = 4096
GUEST_CA = "/.tartarus-build-ca.pem"
# Where OpenSSL-based tools, pip, requests and node look for extra trust; a template's own env wins.
CA_ENV = ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")
STEP_TIMEOUT_S = 3600.0
BOOT_TIMEOUT_S = 60.0


class BuildVM:
    """The build VM: the grown copy of the base image as its root, QEMU user networking, no sandbox
    around it (no namespace, no cgroup, no writable layer); its VMM jailed like a sandbox's, with the
    host's resolver configuration for user networking's DNS."""

    def __init__(self, base: Template, image: Path, workdir: Path) -> None:
        self.template = base
        kernel = kernel_path()
        config = VMConfig(
            kernel=kernel,
            initrd=initramfs_path(),
            drives=[Drive(image, read_only=False)],  # the copy is the root: no separate base, no layer
            accel=choose_accel(kernel),
            vcpus=base.vcpus,
            memory_mib=base.memory_mib,
            kernel_args=[
                "tartarus.root=/dev/vda",
                f"tartarus.rootfstype={base.fstype}",
                "tartarus.rw=none",
                f"tartarus.net={GUEST_NET}",
                "tartarus.hostname=build",
            ],
            console_log=workdir / "console.log",
        )
        config.user_net = True
        config.jail = os.geteuid() == 0  # unprivileged, in a view of its own, like a sandbox's VMM
        self.vm = MicroVM(config, workdir)

    @property
    def env(self) -> dict[str, str]:
        return dict(self.template.env)

    @property
    def agent(self) -> AgentClient:
        if self.vm.agent is None or not self.vm.running:
            raise SandboxFailed(f"the build VM is not running: {self.vm.exit_message}")
        return self.vm.agent


class BuildStepFailed(InvalidArgument):
    """A build step exited non-zero; the message carries its output's tail."""


def grow_ext4(image: Path, extra_mib: int) -> None:
    size = image.stat().st_size + extra_mib * 2**20
    os.truncate(image, size)
    subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True)  # resize2fs wants a checked fs
    result = subprocess.run(["resize2fs", str(image)], capture_output=True, text=True)
    if result.returncode != 0:
        raise InvalidArgument(f"cannot grow {image.name} for the build steps: {result.stderr.strip()}")


def host_ca_bundle() -> bytes | None:
    """The CA certificates the host's OpenSSL trusts (honouring SSL_CERT_FILE), or None if it has none."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_bytes()
    return None


async def _step(
    sb: BuildVM, number: int, step: str, env: dict[str, str], progress: Callable[[str], None]
) -> None:
    progress(f"  step {number}: {step}")
    t0 = time.perf_counter()
    process = await sb.agent.exec(
        ["/bin/sh", "-c", step], env=env, cwd=sb.template.workdir, timeout=STEP_TIMEOUT_S
    )
    tail = b""
    async for event in process.events():
        if isinstance(event, Output):
            tail = (tail + event.data)[-4000:]
    exit_ = process.exit
    assert exit_ is not None
    if exit_.exit_code != 0:
        how = f"exit status {exit_.exit_code}" if exit_.signal is None else f"signal {exit_.signal}"
        raise BuildStepFailed(
            f"build step {number} ({step!r}) failed with {how}:\n{tail.decode(errors='replace')}"
        )
    progress(f"  step {number} done in {time.perf_counter() - t0:.0f} s")


async def _swap_resolver(sb: BuildVM) -> Callable[[], Awaitable[None]]:
    """Point the image's resolver at QEMU's DNS for the steps; return how to put the original back."""
    agent = sb.agent
    try:
        info = await agent.stat(RESOLV)
    except GuestError:
        info = None
    original = None
    if info is not None and info.type == "file":
        original = b"".join([chunk async for chunk in await agent.read_file(RESOLV)])
    await agent.write_file(RESOLV, GUEST_DNS)  # replaces a symlink rather than writing through it

    async def restore() -> None:
        if info is None:
            await agent.remove(RESOLV)
        elif original is not None:
            await agent.write_file(RESOLV, original, mode=info.mode)
        elif info.link is not None:
            await agent.remove(RESOLV)
            await _check(sb, ["ln", "-s", info.link, RESOLV])

    return restore


async def _check(sb: BuildVM, argv: list[str]) -> None:
    process = await sb.agent.exec(argv)
    async for _ in process.events():
        pass
    if process.exit is None or process.exit.exit_code != 0:
        raise InvalidArgument(f"{' '.join(argv)} failed in the build VM: {process.exit}")


async def _run(
    base: Template, steps: list[str], image: Path, workdir: Path, progress: Callable[[str], None]
) -> None:
    sb = BuildVM(base, image, workdir)
    try:
        t0 = time.perf_counter()
        await sb.vm.start()
        await sb.vm.wait_agent(BOOT_TIMEOUT_S)
        progress(f"  build VM up in {time.perf_counter() - t0:.1f} s")
        restore = await _swap_resolver(sb)
        env = sb.env
        bundle = host_ca_bundle()
        if bundle is not None:
            await sb.agent.write_file(GUEST_CA, bundle)
            env = {**dict.fromkeys(CA_ENV, GUEST_CA), **env}
        for number, step in enumerate(steps, 1):
            await _step(sb, number, step, env, progress)
        if bundle is not None:
            await sb.agent.remove(GUEST_CA)
        await restore()
        await _check(sb, ["sync"])
    finally:
        await sb.vm.quit()
        if sb.vm.config.jail:
            jail.give_back(sb.vm.config)  # the image: the daemon's again, not a VMM uid's


def apply_steps(base: Template, steps: list[str], out: Path, progress: Callable[[str], None]) -> Path:
    """Write into `out` (a new directory) the image that `steps` make of `base`; return its path."""
    if base.fstype != "ext4":
        raise InvalidArgument(f"build steps need an ext4 base image, not {base.fstype}")
    image = out / "rootfs.img"
    progress("copying the base image for the build VM")
    sparse_copy(base.rootfs, image)
    grow_ext4(image, HEADROOM_MIB)
    workdir = out / "build-vm"
    workdir.mkdir()
    asyncio.run(_run(base, steps, image, workdir, progress))
    shutil.rmtree(workdir)
    return image
