"""The correctness oracle: for every test image, the tree inside the built filesystem equals what
`umoci unpack` makes of the same image — names, types, modes, owners, link targets, device numbers,
hard-link groups, xattrs, contents and mtimes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from tartarus.images import testing as t
from tartarus.images.api import pull
from tartarus.images.cache import ImageBuild, ImageCache
from tests.images.conftest import Images
from tests.images.jail import jailed
from tests.images.treecmp import differences, mounted, snapshot, umoci_rootfs


def assert_same_tree(build: ImageBuild, layout: Path, tag: str) -> None:
    with umoci_rootfs(layout, tag) as expected_root:
        expected = snapshot(expected_root)
    with mounted(build.rootfs, build.fstype) as mnt:
        actual = snapshot(mnt)
    diffs = differences(expected, actual)
    assert not diffs, "built filesystem differs from umoci unpack:\n" + "\n".join(diffs)


def test_small_image_from_the_registry(images: Images, store: ImageCache) -> None:
    build = pull(images.small, store=store)
    assert build.fstype == "ext4" and build.rootfs.name == "rootfs.ext4"
    assert_same_tree(build, images.layout, "small")
    assert build.config.env["GREETING"] == "hello world"
    assert (build.config.entrypoint, build.config.cmd) == (["/bin/tool"], ["--help"])
    assert (build.config.workdir, build.config.user) == ("/home/user", "1000:1000")
    record = json.loads((build.rootfs.parent / "image.json").read_text())
    assert record["config"]["env"]["GREETING"] == "hello world" and record["refs"] == [images.small]


def test_zstd_layers(images: Images, store: ImageCache) -> None:
    build = pull(images.zstd, store=store)
    # umoci 0.4.7 cannot read zstd: the gzip image holds the very same tars (same diff IDs).
    assert_same_tree(build, images.layout, "small")


def test_docker_schema2_media_types(images: Images, store: ImageCache) -> None:
    build = pull(images.docker, store=store)
    assert_same_tree(build, images.layout, "small")


def test_multi_platform_index_picks_linux_amd64(images: Images, store: ImageCache) -> None:
    build = pull(images.multi, store=store)
    assert build.platform == "linux/amd64" and build.index_digest is not None
    assert_same_tree(build, images.layout, "small")
    arm = pull(images.multi, store=store, platform="linux/arm64")
    assert arm.platform == "linux/arm64" and arm.manifest_digest != build.manifest_digest
    with mounted(arm.rootfs, arm.fstype) as mnt:
        assert (mnt / "etc/arch").read_text() == "arm64\n"


def test_uncompressed_layers_from_a_local_oci_layout(images: Images, store: ImageCache) -> None:
    build = pull(f"oci:{images.layout}:small-plain", store=store)
    assert_same_tree(build, images.layout, "small")


def test_docker_save_tarball(images: Images, store: ImageCache, tmp_path: Path) -> None:
    """A `docker save`-style archive: manifest.json, the config and uncompressed layer tars."""
    layout = images.layout
    index = json.loads((layout / "index.json").read_text())
    desc = next(
        m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == "small"
    )
    manifest = json.loads((layout / "blobs/sha256" / desc["digest"][7:]).read_bytes())
    archive = tmp_path / "saved.tar"
    with tarfile.open(archive, "w") as tf:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        config = (layout / "blobs/sha256" / manifest["config"]["digest"][7:]).read_bytes()
        add(f"{manifest['config']['digest'][7:]}.json", config)
        names = []
        for i, layer in enumerate(manifest["layers"]):
            import gzip

            add(
                f"layer{i}/layer.tar",
                gzip.decompress((layout / "blobs/sha256" / layer["digest"][7:]).read_bytes()),
            )
            names.append(f"layer{i}/layer.tar")
        entry = {
            "Config": f"{manifest['config']['digest'][7:]}.json",
            "RepoTags": ["test/small:1"],
            "Layers": names,
        }
        add("manifest.json", json.dumps([entry]).encode())
    build = pull(f"docker-archive:{archive}", store=store)
    assert_same_tree(build, layout, "small")
    again = pull(f"docker-archive:{archive}:test/small:1", store=store)
    assert again.rootfs == build.rootfs


def test_erofs_output(images: Images, store: ImageCache) -> None:
    build = pull(images.small, store=store, fstype="erofs")
    assert build.fstype == "erofs" and build.rootfs.name == "rootfs.erofs"
    assert_same_tree(build, images.layout, "small")


@pytest.mark.parametrize("fstype", ["ext4", "erofs"])
def test_without_loop_devices_a_directory_is_packed(images: Images, store: ImageCache, fstype: str) -> None:
    build = pull(images.small, store=store, fstype=fstype, loop=False)
    assert_same_tree(build, images.layout, "small")


def test_hostile_archive_is_neutralised_as_umoci_does(
    registry: t.LocalRegistry, workspace: Path, store: ImageCache, tmp_path: Path
) -> None:
    """`..`, absolute paths, writes through symlinks leading out, duplicates: clamped inside, like umoci.

    The archive aims at canaries, not the machine's files, and the pull runs in a jail where only the
    store and the `drop` canary are writable: `sealed` stands for the machine's /etc."""
    drop, sealed = tmp_path / "drop", tmp_path / "sealed"
    drop.mkdir()
    sealed.mkdir()
    (sealed / "passwd").write_text("root:x:0:0:sealed\n")
    layout = workspace / "hostile-layout"
    writer = t.LayoutWriter(layout)
    lower = t.tar_bytes(
        [
            t.directory("./"),  # every directory has an entry, so mtimes are defined (not "now")
            t.directory("etc"),
            t.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
            # The canary's path exists in the image too: a hard link to it must find the image's copy.
            *(t.directory(str(d).lstrip("/")) for d in [*reversed(sealed.parents[:-1]), sealed, drop]),
            t.file(str(sealed / "passwd").lstrip("/"), b"the image's\n"),
            t.symlink("escape", "../../../../../../../../../.." + str(drop)),
            t.symlink("abs", str(sealed)),
            t.symlink("victim", str(sealed / "passwd")),
        ]
    )
    upper = t.tar_bytes(
        [
            t.file("../../../../outside-dotdot", b"dotdot"),
            t.file("/outside-abs", b"abs"),
            t.file("escape/through-symlink", b"through"),
            t.file("abs/shadow", b"shadow"),
            t.file("victim", b"replaced, not written through"),
            t.file("dup", b"one"),
            t.file("dup", b"two"),
            t.hardlink("hl", "/../../" + str(sealed / "passwd")),
        ]
    )
    writer.image([writer.layer(lower), writer.layer(upper)], tag="hostile")
    ref = f"{registry.address}/test/hostile:1"
    t.skopeo_copy(f"oci:{layout}:hostile", f"docker://{ref}")
    build = jailed([store.root.parent, drop], pull, ref, store=store)
    assert any("outside-dotdot" in w for w in build.warnings)
    assert_same_tree(build, layout, "hostile")
    with mounted(build.rootfs, build.fstype) as mnt:
        assert (mnt / str(drop).lstrip("/") / "through-symlink").read_bytes() == b"through"
        assert (mnt / str(sealed).lstrip("/") / "shadow").read_bytes() == b"shadow"
        assert (mnt / "etc/passwd").read_bytes().startswith(b"root:x")
        assert (mnt / "victim").read_bytes().startswith(b"replaced")
        assert (mnt / "hl").read_bytes() == b"the image's\n"
    assert list(drop.iterdir()) == [] and sorted(p.name for p in sealed.iterdir()) == ["passwd"]
    assert (sealed / "passwd").read_text() == "root:x:0:0:sealed\n"


def test_python_slim_equivalent(python_build: ImageBuild) -> None:
    assert_same_tree(python_build, t.python_slim_layout(), t.PYTHON_TAG)
    with mounted(python_build.rootfs, python_build.fstype) as mnt:
        # Layer 4 deleted files of layers 2 and 3 and replaced some of layer 1.
        assert not (mnt / "usr/share/man").exists() and not (mnt / "usr/lib/python3.11/unittest").exists()
        assert sorted(p.name for p in (mnt / "usr/share/doc").iterdir()) == ["README.tartarus"]
        assert (mnt / "etc/hostname").read_text() == "tartarus-python\n"
        assert (mnt / "usr/bin/python3").exists()
