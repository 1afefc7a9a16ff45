"""Fixtures for image tests: local registries (plain and htpasswd), test layouts pushed into them, stores.

Everything runs on loopback; registries and temporary stores are removed at the end of their scope.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tartarus.images import testing as t
from tartarus.images.api import pull
from tartarus.images.cache import ImageBuild, ImageCache

USER, PASSWORD = "tartarus", "s3cret-pw"


@dataclass(frozen=True)
class Images:
    """Refs of the test images in the plain registry, and the layout they came from."""

    layout: Path
    small: str  # OCI manifest, gzip layers
    zstd: str  # same content, zstd layers
    docker: str  # same content, Docker schema 2 media types
    multi: str  # index: amd64 (= small) and arm64


@pytest.fixture(scope="session")
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tartarus-image-tests-") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="session")
def registry(workspace: Path) -> Iterator[t.LocalRegistry]:
    with t.LocalRegistry(workspace / "registry") as reg:
        yield reg


@pytest.fixture(scope="session")
def auth_registry(workspace: Path) -> Iterator[t.LocalRegistry]:
    with t.LocalRegistry(workspace / "auth-registry", user=USER, password=PASSWORD) as reg:
        yield reg


def arm64_image(writer: t.LayoutWriter) -> t.Blob:
    layer = writer.layer(t.tar_bytes([t.directory("etc"), t.file("etc/arch", b"arm64\n")]))
    return writer.image([layer], architecture="arm64")


@pytest.fixture(scope="session")
def layout(workspace: Path) -> Path:
    root = workspace / "layout"
    writer = t.LayoutWriter(root)
    small = t.small_image(writer, "small")
    t.small_image(writer, "small-zstd", compression="zstd")
    t.small_image(writer, "small-plain", compression="")
    writer.index([(small, "amd64"), (arm64_image(writer), "arm64")], tag="multi")
    return root


@pytest.fixture(scope="session")
def images(registry: t.LocalRegistry, layout: Path) -> Images:
    base = f"{registry.address}/test"
    t.skopeo_copy(f"oci:{layout}:small", f"docker://{base}/small:1")
    t.skopeo_copy(f"oci:{layout}:small-zstd", f"docker://{base}/small-zstd:1")
    t.skopeo_copy(f"oci:{layout}:small", f"docker://{base}/small-docker:1", dest_format="v2s2")
    t.skopeo_copy(f"oci:{layout}:multi", f"docker://{base}/multi:1", all_platforms=True)
    return Images(
        layout=layout,
        small=f"{base}/small:1",
        zstd=f"{base}/small-zstd:1",
        docker=f"{base}/small-docker:1",
        multi=f"{base}/multi:1",
    )


@pytest.fixture
def store() -> Iterator[ImageCache]:
    """A fresh, empty image store, deleted after the test."""
    with tempfile.TemporaryDirectory(prefix="tartarus-test-store-") as tmp:
        yield ImageCache(Path(tmp) / "images")


@pytest.fixture(scope="session")
def python_ref(registry: t.LocalRegistry) -> str:
    """The python:3.11-slim equivalent, pushed to the plain registry (built once, then cached)."""
    layout = t.python_slim_layout()
    ref = f"{registry.address}/python:{t.PYTHON_TAG}"
    t.skopeo_copy(f"oci:{layout}:{t.PYTHON_TAG}", f"docker://{ref}")
    return ref


@pytest.fixture(scope="session")
def python_build(python_ref: str, workspace: Path) -> ImageBuild:
    return pull(python_ref, store=ImageCache(workspace / "python-store"))
