"""The VMM jail's pure parts: the uid range, the order uids are claimed in, and what a jail holds."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartarus.errors import InvalidArgument, SandboxFailed, SetupRequired
from tartarus.runtime import jail, ramfile
from tartarus.runtime.qemu import Drive, VMConfig, command_line, qemu_binary
from tests.conftest import wait_until


def test_the_uid_range_comes_from_the_environment_and_bad_values_say_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(jail.UIDS_ENV, raising=False)
    assert jail.uid_range() == jail.UidRange(*jail.DEFAULT_UIDS)
    monkeypatch.setenv(jail.UIDS_ENV, "200000:10")
    assert jail.uid_range() == jail.UidRange(200000, 10)
    for bad in ("200000", "x:10", "0:10", "200000:1", "4294967000:1000"):
        monkeypatch.setenv(jail.UIDS_ENV, bad)
        with pytest.raises(InvalidArgument, match=jail.UIDS_ENV):
            jail.uid_range()


def test_candidates_are_every_vmm_uid_once_never_the_shared_group() -> None:
    uids = jail.UidRange(5000, 4)
    first, second = list(uids.candidates()), list(uids.candidates())
    assert sorted(first) == sorted(second) == [5001, 5002, 5003]
    assert first != second  # each claim starts after the last one: a freed uid is reused last
    assert uids.shared_gid not in first


def test_a_jail_holds_its_vm_files_writable_only_where_qemu_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its layer and console log writable; kernel, initramfs, root filesystem and a memory file mapped
    privately read-only, with the shim that opens the latter read-only if QEMU cannot (before 8.2); a
    snapshot build's memory file, which its VMM writes, writable."""
    config = VMConfig(
        kernel=Path("/c/kernel"),
        initrd=Path("/c/initrd"),
        drives=[Drive(Path("/c/rootfs.img"), read_only=True), Drive(Path("/s/sb-1/layer.ext4"), False)],
        accel="tcg",
        console_log=Path("/s/sb-1/console.log"),
        memory_file=Path("/c/memory"),
        memory_share=False,
    )
    shim = Path("/c/ramfile/lib.so")
    monkeypatch.setattr(ramfile, "shim_path", lambda: shim)
    monkeypatch.setattr(jail, "qemu_binary", lambda: "qemu")
    for native in (False, True):
        monkeypatch.setattr(ramfile, "native_read_only", lambda qemu, native=native: native)
        seen = jail.view(config)
        expected = {
            Path("/usr"),
            Path("/c/kernel"),
            Path("/c/initrd"),
            Path("/c/rootfs.img"),
            Path("/c/memory"),
        }
        assert set(seen.read_only) - set(map(Path, jail.DEVICES)) == expected | (
            {shim} if not native else set()
        )
        assert set(seen.writable) == {Path("/s/sb-1/layer.ext4"), Path("/s/sb-1/console.log")}
        assert jail.environment(config) == (
            {} if native else {"LD_PRELOAD": str(shim), ramfile.PATH_ENV: "/c/memory"}
        )
        assert not [p for p in (*seen.read_only, *seen.writable) if p.is_relative_to("/etc")]
    assert Path("/dev/kvm") in jail.view(VMConfig(**{**config.__dict__, "accel": "kvm"})).writable
    restore = jail.view(VMConfig(**{**config.__dict__, "incoming": True}))
    assert not {Path("/c/kernel"), Path("/c/initrd")} & set(restore.read_only)  # it never boots
    build = jail.view(VMConfig(**{**config.__dict__, "memory_share": True}))
    assert Path("/c/memory") in build.writable and shim not in build.read_only
    assert jail.environment(VMConfig(**{**config.__dict__, "memory_share": True})) == {}


def test_qemu_is_asked_whether_it_opens_a_private_memory_file_read_only(tmp_path: Path) -> None:
    """`rom` in memory-backend-file's properties (QEMU >= 8.2), read from the binary's own help."""
    for name, props in (("new", "  readonly=<bool>\n  rom=<OnOffAuto>\n"), ("old", "  readonly=<bool>\n")):
        fake = tmp_path / name
        fake.write_text(f"#!/bin/sh\nprintf 'memory-backend-file options:\\n{props}'\n")
        fake.chmod(0o755)
        assert ramfile.native_read_only(str(fake)) is (name == "new")
    line = command_line(
        VMConfig(
            kernel=Path("k"),
            initrd=Path("i"),
            drives=[],
            accel="tcg",
            memory_file=Path("/m"),
            memory_share=False,
        ),
        qmp_fd=3,
        agent_fd=4,
    )
    (backend,) = [a for a in line if a.startswith("memory-backend-file")]
    assert ("readonly=on,rom=off" in backend) is ramfile.native_read_only(qemu_binary())


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory another uid may enter (pytest's tmp_path is root's alone)."""
    with tempfile.TemporaryDirectory(prefix="tartarus-ramfile-") as name:
        os.chmod(name, 0o755)
        yield Path(name)


def test_the_shim_opens_exactly_the_memory_file_read_only_and_a_private_mapping_stays_writable(
    open_dir: Path,
) -> None:
    """Preloaded into an unprivileged process, an O_RDWR open of the named file (read-only to it) gets
    an O_RDONLY fd, which a private writable mapping accepts, and the file is unchanged; without the
    shim the same open fails, and another path's O_RDWR is untouched."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the probe as another uid")
    memory, other = open_dir / "memory", open_dir / "other"
    memory.write_bytes(b"template" * 512)
    other.write_bytes(b"")
    memory.chmod(0o644)
    other.chmod(0o666)
    probe = (
        "import mmap, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "m = mmap.mmap(fd, 4096, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)\n"
        "m[:8] = b'guestram'\n"
        "fds = (fd, os.open(sys.argv[2], os.O_RDWR))\n"
        "print(*(open(f'/proc/self/fdinfo/{f}').read().split()[3] for f in fds), m[:8].decode())\n"
    )
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    shim = open_dir / ramfile.NAME  # the cache is root's: a copy, as a jail's bind mount would show it
    shutil.copyfile(ramfile.build_shim(), shim)
    shim.chmod(0o644)
    env = {"PATH": "/usr/bin:/bin", "LD_PRELOAD": str(shim), ramfile.PATH_ENV: str(memory)}
    out = subprocess.run(
        [*as_nobody, "/usr/bin/python3", "-c", probe, str(memory), str(other)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    flags, other_flags, written = out.stdout.split()
    assert int(flags, 8) & os.O_ACCMODE == os.O_RDONLY and written == "guestram"
    assert int(other_flags, 8) & os.O_ACCMODE == os.O_RDWR
    assert memory.read_bytes() == b"template" * 512
    del env["LD_PRELOAD"]
    out = subprocess.run(
        [*as_nobody, "/usr/bin/python3", "-c", probe, str(memory), str(other)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "PermissionError" in out.stderr


def test_a_claimed_uid_is_never_claimed_again_until_its_holder_lets_go() -> None:
    """The claim is an flock its VMM inherits: while any holder has it, no other claim gets that uid."""
    if os.geteuid() != 0:
        pytest.skip("claims live in /run, root's")
    uids = jail.UidRange(1_400_000_000, 3)  # two VMM uids, apart from any a daemon uses
    first, second = jail.claim_uid(uids), jail.claim_uid(uids)
    try:
        assert first.uid != second.uid and jail.is_claimed(first.uid)
        with pytest.raises(SandboxFailed, match="in use"):
            jail.claim_uid(uids)
        first.close()
        assert not jail.is_claimed(first.uid)
        third = jail.claim_uid(uids)
        assert third.uid == first.uid
        third.close()
    finally:
        first.close()
        second.close()


def test_a_vmm_that_drops_its_lock_keeps_its_uid_from_others_while_it_runs() -> None:
    """The VMM holds its claim's fd and could unlock it; the pid recorded in the claim still marks the
    uid taken as long as a process of that pid runs as that uid."""
    if os.geteuid() != 0:
        pytest.skip("claims live in /run, root's")
    uids = jail.UidRange(1_400_000_100, 2)  # one VMM uid
    holder = subprocess.Popen(
        ["setpriv", "--reuid=1400000101", "--regid=1400000101", "--clear-groups", "sleep", "60"]
    )
    try:
        assert wait_until(lambda: f"{1_400_000_101}" in Path(f"/proc/{holder.pid}/status").read_text(), 10)
        claim = jail.claim_uid(uids)
        claim.record(holder.pid)
        claim.close()  # the lock is gone, as if the VMM had let go of it
        with pytest.raises(SandboxFailed, match="in use"):
            jail.claim_uid(uids)
    finally:
        holder.kill()
        holder.wait()
    jail.claim_uid(uids).close()  # its process gone, the uid is free


def test_kvm_gives_the_device_group_never_root_and_says_how_to_fix_a_root_only_device() -> None:
    def device(mode: int, gid: int) -> os.stat_result:
        return os.stat_result((0o20000 | mode, 0, 0, 1, 0, gid, 0, 0, 0, 0))

    assert jail.device_groups(device(0o660, 36)) == (36,)
    assert jail.device_groups(device(0o666, 0)) == ()
    for root_only in (device(0o600, 0), device(0o660, 0), device(0o600, 36)):
        with pytest.raises(SetupRequired, match="root:kvm 0660"):
            jail.device_groups(root_only)
    assert jail.kvm_groups(VMConfig(kernel=Path("k"), initrd=Path("i"), drives=[], accel="tcg")) == ()
