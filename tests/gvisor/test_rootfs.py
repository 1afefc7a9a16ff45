"""A template's image extracted into the directory tree gVisor runs from (real mount and copy)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from tartarus.errors import InvalidArgument
from tartarus.gvisor.rootfs import template_tree, tree_key
from tartarus.gvisor.spec import AGENT_DIR
from tartarus.templates.built import Template


@pytest.fixture
def image_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Template:
    """A tiny ext4 image with a few files, and a private cache to extract it into."""
    monkeypatch.setenv("TARTARUS_CACHE_DIR", str(tmp_path / "cache"))
    tree = tmp_path / "src"
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "bin" / "hello").write_text("#!/bin/sh\necho hello\n")
    (tree / "usr" / "bin" / "hello").chmod(0o755)
    (tree / "etc").mkdir()
    (tree / "etc" / "secret").write_text("only root\n")
    (tree / "etc" / "secret").chmod(0o600)
    image = tmp_path / "rootfs.img"
    subprocess.run(["mkfs.ext4", "-q", "-O", "^has_journal", "-d", str(tree), str(image), "8M"], check=True)
    return Template(name="tiny", key="k", rootfs=image, fstype="ext4")


def _mounts() -> str:
    return Path("/proc/self/mounts").read_text()


def test_the_images_files_are_extracted_with_their_modes_and_the_agents_mount_point(
    image_template: Template,
) -> None:
    before = _mounts()
    tree = template_tree(image_template)
    assert (tree / "usr" / "bin" / "hello").read_text() == "#!/bin/sh\necho hello\n"
    assert os.access(tree / "usr" / "bin" / "hello", os.X_OK)
    assert (tree / "etc" / "secret").stat().st_mode & 0o777 == 0o600
    assert (tree / AGENT_DIR.lstrip("/")).is_dir()
    assert _mounts() == before  # the image was mounted only while it was copied


def test_the_tree_is_extracted_once_and_reused(image_template: Template) -> None:
    tree = template_tree(image_template)
    marker = tree / "marker"
    marker.write_text("x")
    assert template_tree(image_template) == tree and marker.exists()


def test_another_image_gets_another_tree(image_template: Template, tmp_path: Path) -> None:
    other = dataclasses.replace(image_template, rootfs=tmp_path / "other.img")
    assert tree_key(other) != tree_key(image_template)


def test_an_image_type_gvisor_cannot_read_is_refused(image_template: Template) -> None:
    with pytest.raises(InvalidArgument, match="squashfs"):
        template_tree(dataclasses.replace(image_template, fstype="squashfs"))
