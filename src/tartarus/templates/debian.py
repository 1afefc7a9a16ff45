"""Build a template's root filesystem from Debian packages with debootstrap.

The mirror is read from apt's configured sources at run time, never written into the repo.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tartarus.bootfiles.cache import cached, digest
from tartarus.errors import InvalidArgument, SetupRequired, TartarusError
from tartarus.templates.spec import DebianBase, TemplateSpec

log = logging.getLogger(__name__)

BUILDER_VERSION = "debootstrap-ext4-v1"
RETRY_PAUSE_S = 10.0
# Removed from the tree before imaging: package caches that only cost space in every sandbox.
PRUNE = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info")


def debian_mirror() -> str:
    """The first Debian mirror apt is configured with (deb822 or one-line format)."""
    candidates = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in candidates:
        text = path.read_text()
        for stanza in text.split("\n\n"):
            if re.search(r"^Suites:.*\bbookworm\b", stanza, re.M) and "security" not in stanza:
                m = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                if m:
                    return m.group(1)
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if path.exists():
            for line in path.read_text().splitlines():
                m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", line)
                if m and "security" not in line:
                    return m.group(1)
    raise SetupRequired("no Debian mirror configured in /etc/apt/sources*")


def debootstrap(args: list[str], tree: Path, mirror: str, attempts: int = 4) -> None:
    """`debootstrap ARGS TREE MIRROR`, retried from scratch after a growing pause: it has no retries of
    its own, and a mirror that drops one download, or is unreachable for a few seconds, fails the run."""
    for attempt in range(1, attempts + 1):
        result = subprocess.run(["debootstrap", *args, str(tree), mirror], capture_output=True, text=True)
        if result.returncode == 0:
            return
        shutil.rmtree(tree, ignore_errors=True)
        output = (result.stdout + result.stderr).splitlines()
        why = "; ".join([line for line in output if line.startswith(("E:", "W:"))][-5:] or output[-5:])
        if attempt == attempts:
            raise TartarusError(f"debootstrap failed {attempts} times; the last time: {why}")
        log.warning("debootstrap failed (attempt %d of %d): %s", attempt, attempts, why)
        time.sleep(RETRY_PAUSE_S * attempt)  # give the mirror time to come back


def image_tree(tree: Path, image: Path, label: str) -> None:
    """Pack a directory into an ext4 image sized to fit (no journal: the base is mounted read-only)."""
    used = int(
        subprocess.run(["du", "-sb", str(tree)], capture_output=True, text=True, check=True).stdout.split()[0]
    )
    inodes = int(
        subprocess.run(
            ["sh", "-c", f"find {str(tree)!r} -xdev | wc -l"], capture_output=True, text=True, check=True
        ).stdout
    )
    size_mib = int(used * 1.25 / 2**20) + 64
    subprocess.run(
        [
            "mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", label, "-b", "4096",
            "-N", str(inodes + 4096), "-d", str(tree), str(image), f"{size_mib}M",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip


def build_debian_rootfs(spec: TemplateSpec, progress: Callable[[str], None] = print) -> tuple[Path, str]:
    """The spec's Debian root filesystem image and the key it is cached under."""
    base = spec.base
    if not isinstance(base, DebianBase):
        raise InvalidArgument(f"template {spec.name!r} is not built from Debian packages")
    mirror = debian_mirror()
    rootfs_key = digest([BUILDER_VERSION, base.debian, *sorted(spec.packages)])

    def build_rootfs(out: Path) -> None:
        root = out / "tree"
        progress(f"debootstrap {base.debian} with {', '.join(spec.packages)}")
        args = ["--variant=minbase"]
        if spec.packages:
            args.append("--include=" + ",".join(spec.packages))
        debootstrap([*args, base.debian], root, mirror)
        for rel in PRUNE:
            target = root / rel
            if target.is_dir():
                shutil.rmtree(target)
                target.mkdir()
        progress("packing the root filesystem (ext4)")
        image_tree(root, out / "rootfs.img", spec.name[:16])
        shutil.rmtree(root)

    return cached("rootfs", rootfs_key, build_rootfs) / "rootfs.img", rootfs_key
