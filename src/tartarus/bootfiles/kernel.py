"""The guest kernel: Debian's linux-source-6.1 + kernel/microvm.config, built once per input hash."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from tartarus.bootfiles.cache import cached, digest
from tartarus.errors import SetupRequired
from tartarus.paths import REPO_ROOT, cache_dir

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
CONFIG = REPO_ROOT / "kernel" / "microvm.config"
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-kernel"


def _source_version() -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError) as e:
        raise SetupRequired(f"{SOURCE_PACKAGE} is not installed: run ./scripts/setup") from e
    return out.stdout.strip()


@functools.cache
def kernel_key() -> str:
    return digest([_source_version(), CONFIG.read_bytes(), BUILD_SCRIPT.read_bytes()])


def build_kernel() -> Path:
    """Return the path of the bzImage, building it (about 5 minutes on 2 cores) if needed."""

    def build(out: Path) -> None:
        subprocess.run([str(BUILD_SCRIPT), str(SOURCE_TARBALL), str(CONFIG), str(out)], check=True)

    return cached("kernel", kernel_key(), build) / "bzImage"


def kernel_path() -> Path:
    """The built kernel, or SetupRequired: never builds on a hot path."""
    path = cache_dir() / "kernel" / kernel_key() / "bzImage"
    if not path.exists():
        raise SetupRequired("guest kernel is not built: run ./scripts/setup")
    return path
