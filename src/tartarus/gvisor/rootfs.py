"""A template's root filesystem as the directory tree gVisor needs, extracted once per image.

The template's image (ext4 or erofs, built for the VMs' virtio-blk) is the one source for both
backends: gVisor reads a directory, so the image's files are copied once into a cached tree keyed by
the image, which every gVisor sandbox of the template shares read-only (each gets its own writable
overlay from runsc). A copy rather than a standing loop mount: nothing to re-mount after a reboot or
leak after a crash, and the tree can carry the agent's mount point, which runsc cannot create in a
read-only tree.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tartarus.bootfiles.cache import cached, digest
from tartarus.errors import InvalidArgument, TartarusError
from tartarus.gvisor.spec import AGENT_DIR
from tartarus.templates.built import Template

LAYOUT = "gvisor-tree-v1"  # bump when the extraction below changes what the tree holds
FSTYPES = ("ext4", "erofs")


@contextlib.contextmanager
def _mounted(image: Path, fstype: str) -> Iterator[Path]:
    """The image mounted read-only on a private temporary directory, unmounted on the way out."""
    options = "ro,loop,noload" if fstype == "ext4" else "ro,loop"  # noload: never replay a journal
    with tempfile.TemporaryDirectory(prefix="tartarus-extract-") as mnt:
        result = subprocess.run(
            ["mount", "-t", fstype, "-o", options, str(image), mnt], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise TartarusError(f"cannot mount {image} ({fstype}): {result.stderr.strip()}")
        try:
            yield Path(mnt)
        finally:
            subprocess.run(["umount", mnt], check=True, capture_output=True)


def _extract(image: Path, fstype: str, out: Path) -> None:
    tree = out / "rootfs"
    with _mounted(image, fstype) as mnt:
        result = subprocess.run(
            ["cp", "-a", "--one-file-system", f"{mnt}/.", str(tree)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise TartarusError(f"cannot copy {image}'s files: {result.stderr.strip()[-500:]}")
    (tree / AGENT_DIR.lstrip("/")).mkdir(mode=0o755, exist_ok=True)
    tree.chmod(0o755)


def tree_key(template: Template) -> str:
    """The image path names its content (rootfs/<hash of its inputs>/), so it keys the tree."""
    return digest([LAYOUT, str(template.rootfs), template.fstype])


def template_tree(template: Template) -> Path:
    """The template's tree for gVisor, extracted from its image on first use (concurrent callers wait
    for one extraction)."""
    if template.fstype not in FSTYPES:
        raise InvalidArgument(f"template {template.name!r}: cannot serve a {template.fstype} image to gVisor")
    image = template.rootfs
    return (
        cached("gvisor-trees", tree_key(template), lambda out: _extract(image, template.fstype, out))
        / "rootfs"
    )
