"""Images (Erebus): OCI and Docker images from registries, layouts and `docker save` tarballs, turned into
read-only root filesystems that Tartarus VMs boot.

    build = tartarus.images.pull("127.0.0.1:5000/python:3.11-slim")
    template = tartarus.images.to_template(build, "python-slim")

Attributes load lazily, so the conversion worker (`python -m tartarus.images.worker`) does not pay for
httpx and the templates package at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tartarus.images.api import pull, to_template
    from tartarus.images.cache import ImageBuild, ImageCache
    from tartarus.images.manifest import ImageConfig

__all__ = ["ImageBuild", "ImageCache", "ImageConfig", "pull", "to_template"]

_WHERE = {
    "pull": "tartarus.images.api",
    "to_template": "tartarus.images.api",
    "ImageBuild": "tartarus.images.cache",
    "ImageCache": "tartarus.images.cache",
    "ImageConfig": "tartarus.images.manifest",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'tartarus.images' has no attribute {name!r}")
