"""The agent initramfs: the static guest agent as /init, in a cpio archive written here (no tools).

The agent lives in the initramfs rather than in each image, so any root filesystem boots with it and
a hostile image cannot replace it before it runs.
"""

from __future__ import annotations

import functools
import shutil
import stat
import subprocess
from pathlib import Path

from tartarus.bootfiles.cache import cached, digest
from tartarus.errors import SetupRequired
from tartarus.paths import REPO_ROOT, cache_dir

AGENT_SRC = REPO_ROOT / "agent"


def _sources() -> list[Path]:
    return sorted(p for p in AGENT_SRC.iterdir() if p.suffix in (".c", ".h") or p.name == "Makefile")


def gcc_version() -> str:
    """The compiler's identity, part of the key of everything built with it."""
    try:
        return subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SetupRequired("gcc is not installed: run ./scripts/setup") from e


@functools.cache
def initramfs_key() -> str:
    parts: list[bytes | str] = [gcc_version()]
    for path in _sources():
        parts += [path.name, path.read_bytes()]
    return digest(parts)


def _newc_entry(
    name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0
) -> bytes:
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    header = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
    out = header + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def cpio_archive(agent: bytes) -> bytes:
    entries = [
        _newc_entry("dev", stat.S_IFDIR | 0o755, ino=1),
        _newc_entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1), ino=2),
        _newc_entry("proc", stat.S_IFDIR | 0o755, ino=3),
        _newc_entry("sys", stat.S_IFDIR | 0o755, ino=4),
        _newc_entry("mnt", stat.S_IFDIR | 0o755, ino=5),
        _newc_entry("newroot", stat.S_IFDIR | 0o755, ino=6),
        _newc_entry("init", stat.S_IFREG | 0o755, agent, ino=7),
        _newc_entry("TRAILER!!!", 0),
    ]
    return b"".join(entries)


def build_initramfs() -> Path:
    def build(out: Path) -> None:
        src = out / "src"
        src.mkdir()
        for path in _sources():
            shutil.copy2(path, src / path.name)
        subprocess.run(["make", "-s", "-C", str(src)], check=True)
        shutil.move(src / "tartarus-agent", out / "tartarus-agent")
        shutil.rmtree(src)
        agent = (out / "tartarus-agent").read_bytes()
        (out / "initramfs.cpio").write_bytes(cpio_archive(agent))

    return cached("initramfs", initramfs_key(), build) / "initramfs.cpio"


def initramfs_path() -> Path:
    path = cache_dir() / "initramfs" / initramfs_key() / "initramfs.cpio"
    if not path.exists():
        raise SetupRequired("guest agent initramfs is not built: run ./scripts/setup")
    return path
