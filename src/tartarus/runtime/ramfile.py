"""A template's memory file, opened read-only by the VMMs that map it privately (`ramfile.c`).

Restores map the file copy-on-write and never write it, yet QEMU before 8.2 opens it O_RDWR; its
`readonly=on` would make guest RAM a ROM. QEMU 8.2 added `rom=off` for exactly this: `readonly=on,rom=off`
opens the file O_RDONLY and maps it private and writable. With a QEMU that has it, that is used; with
one that has not, a jailed QEMU gets a preloaded shim that opens that one path O_RDONLY instead. Either
way the file stays root's and read-only to every VMM, so an escaped VMM cannot change the RAM that
every other restore of its template starts from.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from tartarus.bootfiles.cache import cached, digest
from tartarus.bootfiles.initramfs import gcc_version
from tartarus.errors import SetupRequired
from tartarus.paths import cache_dir

SOURCE = Path(__file__).with_name("ramfile.c")
NAME = "libtartarus-ramfile.so"
PATH_ENV = "TARTARUS_RAM_FILE"  # the one path the shim opens read-only (ramfile.c)


@functools.cache
def native_read_only(qemu: str) -> bool:
    """True if `qemu`'s memory-backend-file has `rom` (QEMU >= 8.2): asked, never assumed from a
    version number (distributions backport)."""
    try:
        out = subprocess.run(
            [qemu, "-object", "memory-backend-file,help"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(line.strip().startswith("rom=") for line in out.splitlines())


@functools.cache
def shim_key() -> str:
    return digest([gcc_version(), SOURCE.read_bytes()])


def build_shim() -> Path:
    def build(out: Path) -> None:
        flags = ["-std=gnu11", "-Os", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-s"]
        subprocess.run(["gcc", *flags, "-o", str(out / NAME), str(SOURCE)], check=True)
        os.chmod(out / NAME, 0o644)  # read (and mapped) by the VMM's uid, through its jail's bind mount

    return cached("ramfile", shim_key(), build) / NAME


@functools.cache
def shim_path() -> Path:
    path = cache_dir() / "ramfile" / shim_key() / NAME
    if not path.exists():
        raise SetupRequired("the VMM's read-only RAM shim is not built: run ./scripts/setup")
    return path


def shim_environment(memory_file: Path) -> dict[str, str]:
    """What a QEMU without `rom` needs in its environment to open `memory_file` read-only."""
    return {"LD_PRELOAD": str(shim_path()), PATH_ENV: str(memory_file)}
