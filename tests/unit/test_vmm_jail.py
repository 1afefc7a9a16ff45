"""The VMM jail's pure parts: the uid range, the order uids are claimed in, and what a jail holds."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tartarus.errors import InvalidArgument, SandboxFailed, SetupRequired
from tartarus.runtime import jail
from tartarus.runtime.qemu import Drive, VMConfig
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


def test_a_jail_holds_its_vm_files_writable_only_where_qemu_writes() -> None:
    config = VMConfig(
        kernel=Path("/c/kernel"),
        initrd=Path("/c/initrd"),
        drives=[Drive(Path("/c/rootfs.img"), read_only=True), Drive(Path("/s/sb-1/layer.ext4"), False)],
        accel="tcg",
        console_log=Path("/s/sb-1/console.log"),
        memory_file=Path("/c/memory"),
        memory_share=False,
    )
    seen = jail.view(config)
    assert {Path("/usr"), Path("/c/kernel"), Path("/c/initrd"), Path("/c/rootfs.img")} <= set(seen.read_only)
    assert set(seen.writable) == {Path("/s/sb-1/layer.ext4"), Path("/s/sb-1/console.log"), Path("/c/memory")}
    assert not [p for p in (*seen.read_only, *seen.writable) if p.is_relative_to("/etc")]
    assert Path("/dev/kvm") in jail.view(VMConfig(**{**config.__dict__, "accel": "kvm"})).writable


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
