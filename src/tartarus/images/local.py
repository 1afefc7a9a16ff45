"""Public base images built on this host from Debian packages, as OCI image layouts.

Templates start from public images such as python:3.11-slim, but a host that reaches no image registry
(this project's development and CI machines reach only Debian's apt, PyPI and npm) cannot pull them. For
such an image Tartarus keeps a recipe that builds its equivalent with debootstrap and writes it as an OCI
image layout in the cache, keyed by the recipe and the mirror. A template names it with
`base: {local_image: NAME}` and the template builder converts it like any other image (`oci:DIR:TAG`):
from there on, the path is the one a registry image takes.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tartarus.bootfiles.cache import cached, digest
from tartarus.errors import NotFound
from tartarus.images.layout import LayoutWriter
from tartarus.templates.debian import PRUNE, debian_mirror, debootstrap

RECIPE_VERSION = "local-image-v1"


@dataclass(frozen=True)
class Recipe:
    """What goes into one local image: Debian packages, paths removed after install, image config."""

    suite: str
    packages: tuple[str, ...]
    remove: tuple[str, ...]
    env: tuple[str, ...]
    cmd: tuple[str, ...]


RECIPES = {
    # Docker Hub's python:3.11-slim: Debian bookworm, CPython 3.11 and pip, run as root from /.
    "python:3.11-slim": Recipe(
        suite="bookworm",
        packages=("python3", "python3-pip", "python-is-python3", "ca-certificates", "netbase"),
        # Debian marks its Python as managed by apt (PEP 668); the official image's is not, so that
        # `pip install` in a template's steps installs into it as written (to /usr/local, as there).
        # debootstrap copies the host's resolver and hostname in: an image carries neither.
        remove=("usr/lib/python3.11/EXTERNALLY-MANAGED", "etc/resolv.conf", "etc/hostname", *PRUNE),
        env=(
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG=C.UTF-8",
            "PYTHON_VERSION=3.11",
        ),
        cmd=("python3",),
    ),
}


def local_image(name: str, progress: Callable[[str], None] = print) -> str:
    """The `oci:DIR:TAG` reference of the local image `name`, built now if it is not cached."""
    recipe = RECIPES.get(name)
    if recipe is None:
        raise NotFound(f"no local image named {name!r} (known: {', '.join(sorted(RECIPES))})")
    mirror = debian_mirror()
    key = digest([RECIPE_VERSION, name, repr(recipe), mirror])
    tag = name.rpartition(":")[2]
    layout = cached("local-images", key, lambda out: _build(recipe, mirror, tag, out, progress)) / "layout"
    return f"oci:{layout}:{tag}"


def _build(recipe: Recipe, mirror: str, tag: str, out: Path, progress: Callable[[str], None]) -> None:
    tree = out / "tree"
    progress(f"debootstrap {recipe.suite} with {', '.join(recipe.packages)}")
    debootstrap(["--variant=minbase", f"--include={','.join(recipe.packages)}", recipe.suite], tree, mirror)
    for rel in recipe.remove:
        target = tree / rel
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
            target.mkdir()
        else:
            target.unlink(missing_ok=True)
    progress("writing the OCI image layout")
    raw = out / "layer.tar"
    subprocess.run(
        [
            "tar", "--create", f"--file={raw}", f"--directory={tree}", "--format=posix", "--sort=name",
            "--numeric-owner", "--xattrs", "--xattrs-include=*", "--pax-option=delete=atime,delete=ctime",
            ".",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    shutil.rmtree(tree)
    writer = LayoutWriter(out / "layout")
    layer = writer.layer(raw, "zstd")
    raw.unlink()
    config = {"Env": list(recipe.env), "Cmd": list(recipe.cmd), "WorkingDir": "/"}
    writer.image([layer], tag=tag, config=config, created_by=f"debootstrap {recipe.suite} ({RECIPE_VERSION})")
