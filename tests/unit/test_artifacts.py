"""Pure pieces of the artefact pipeline: cpio layout, sparse copies, command lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from tartarus.bootfiles.initramfs import cpio_archive
from tartarus.runtime.disks import sparse_copy
from tartarus.runtime.qemu import (
    TCG_CPU,
    Drive,
    VMConfig,
    boot_files,
    command_line,
    environment,
    huge_pages,
    kernel_cmdline,
)


def test_cpio_is_newc_with_init_and_trailer() -> None:
    archive = cpio_archive(b"\x7fELF-agent")
    assert archive.startswith(b"070701")
    assert b"init\0" in archive and b"\x7fELF-agent" in archive
    assert b"TRAILER!!!\0" in archive
    assert len(archive) % 4 == 0


def test_sparse_copy_keeps_holes_and_content(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    with src.open("wb") as f:
        f.write(b"head")
        f.seek(64 << 20)
        f.write(b"tail")
    dst = tmp_path / "dst.img"
    sparse_copy(src, dst)
    assert dst.stat().st_size == src.stat().st_size
    assert dst.read_bytes()[:4] == b"head" and dst.read_bytes()[-4:] == b"tail"
    assert dst.stat().st_blocks * 512 < 1 << 20  # still sparse


def test_sparse_copy_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    (tmp_path / "b").write_bytes(b"y")
    with pytest.raises(FileExistsError):
        sparse_copy(tmp_path / "a", tmp_path / "b")


def _config(accel: str) -> VMConfig:
    return VMConfig(
        kernel=Path("/k"),
        initrd=Path("/i"),
        drives=[Drive(Path("/base"), read_only=True), Drive(Path("/rw"), read_only=False)],
        accel=accel,
        kernel_args=["tartarus.hostname=x"],
    )


def test_command_line_differs_only_in_accelerator() -> None:
    tcg = command_line(_config("tcg"), qmp_fd=3, agent_fd=4)
    kvm = command_line(_config("kvm"), qmp_fd=3, agent_fd=4)
    diff = {a for a in tcg if a not in kvm} | {a for a in kvm if a not in tcg}
    assert diff == {"tcg,thread=single,tb-size=128", TCG_CPU, "kvm", "host"}
    assert "-no-reboot" in tcg and "socket,id=agent,fd=4,server=on,wait=off" in tcg
    assert any("read-only=on" in a and "/base" in a for a in tcg)


def test_only_a_booting_vm_is_given_a_kernel_to_keep() -> None:
    """A restore (incoming state) never boots: no kernel, initramfs or command line for QEMU to hold."""
    boot = command_line(_config("tcg"), qmp_fd=3, agent_fd=4)
    assert boot[boot.index("-kernel") + 1] == "/k" and boot[boot.index("-initrd") + 1] == "/i"
    assert boot[boot.index("-append") + 1].endswith("tartarus.hostname=x")
    restore = command_line(VMConfig(**{**_config("tcg").__dict__, "incoming": True}), qmp_fd=3, agent_fd=4)
    assert not {"-kernel", "-initrd", "-append", "/k", "/i"} & set(restore)
    assert restore[-3:] == ["-S", "-incoming", "defer"]
    assert [a for a in boot if a not in restore] == boot_files(_config("tcg"))


def test_only_tcg_goes_without_transparent_huge_pages() -> None:
    assert not huge_pages(_config("tcg")) and huge_pages(_config("kvm"))


def test_only_single_threaded_tcg_keeps_to_one_malloc_arena() -> None:
    assert environment(_config("tcg")) == {"MALLOC_ARENA_MAX": "1"}
    assert environment(_config("kvm")) == {}
    assert environment(VMConfig(**{**_config("tcg").__dict__, "vcpus": 2})) == {}


def test_unknown_accelerator_refused() -> None:
    with pytest.raises(ValueError):
        command_line(_config("hvf"), qmp_fd=3, agent_fd=4)


def test_kernel_cmdline_panics_to_exit_and_keeps_extra_args() -> None:
    line = kernel_cmdline(_config("tcg"))
    assert "panic=-1" in line and "reboot=t" in line and line.endswith("tartarus.hostname=x")


def test_snapshot_key_covers_the_guest_cpu_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot saved with one CPU model must not be restored into another (its code paths chose on it)."""
    from tartarus.runtime import qemu
    from tartarus.snapshots import snapshot as store
    from tartarus.templates.built import Template

    monkeypatch.setattr(store, "choose_accel", lambda kernel: "tcg")
    monkeypatch.setattr(store, "kernel_path", lambda: Path("/k"))
    template = Template(name="t", key="k", rootfs=Path("/r"), fstype="ext4")
    key = store._snapshot_key(template)
    monkeypatch.setattr(qemu, "TCG_CPU", "qemu64")
    assert store._snapshot_key(template) != key
