"""The registry client against Debian's docker-registry (plain and htpasswd) and a fault-injecting fake:
auth flows, retries, and a clear typed error for every failure — with nothing left behind."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tartarus.images import registry as registry_module
from tartarus.images import testing as t
from tartarus.images.api import pull
from tartarus.images.cache import ImageCache
from tartarus.images.errors import (
    DigestMismatch,
    ImageNotFound,
    RegistryAuthError,
    TruncatedBlob,
    UnsupportedMediaType,
)
from tests.images.conftest import PASSWORD, USER, Images
from tests.images.fake_registry import Behaviour, fake_registry
from tests.images.test_oracle import assert_same_tree


def write_auth(path: Path, registry: str, user: str, password: str) -> Path:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {registry: {"auth": auth}}}))
    return path


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No docker config anywhere but what the test writes; retries without backoff."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.setattr(registry_module, "BACKOFF_S", 0.0)
    return tmp_path


def assert_nothing_left(store: ImageCache) -> None:
    assert not list(store.builds.iterdir()), "a failed pull published a build"
    assert not list(store.tmp.iterdir()), "a failed pull left work files"
    leftovers = [p for p in store.blobs.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert not leftovers, f"partial downloads left: {leftovers}"


def unique_image(layout: Path, tag: str) -> None:
    """An image whose layer blob no other test shares (so corrupting it in the registry is local)."""
    writer = t.LayoutWriter(layout)
    layer = writer.layer(t.tar_bytes([t.file("unique", tag.encode() * 50_000)]))
    writer.image([layer], tag=tag)


def test_unknown_tag_and_repository(images: Images, store: ImageCache, no_credentials: Path) -> None:
    with pytest.raises(ImageNotFound, match=r"test/small:nope.*not found.*MANIFEST_UNKNOWN"):
        pull(images.small.replace(":1", ":nope"), store=store)
    with pytest.raises(ImageNotFound, match="no-such-repo"):
        pull(images.small.replace("test/small", "no-such-repo"), store=store)
    with pytest.raises(
        ImageNotFound, match=r"no image for platform linux/s390x \(it offers: linux/amd64, linux/arm64\)"
    ):
        pull(images.multi, store=store, platform="linux/s390x")


def test_htpasswd_registry(
    auth_registry: t.LocalRegistry,
    images: Images,
    store: ImageCache,
    no_credentials: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref = f"{auth_registry.address}/private/small:1"
    t.skopeo_copy(f"oci:{images.layout}:small", f"docker://{ref}", creds=f"{USER}:{PASSWORD}")
    with pytest.raises(RegistryAuthError, match="requires credentials"):
        pull(ref, store=store)
    wrong = write_auth(no_credentials / "wrong.json", auth_registry.address, USER, "not-the-password")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(wrong))
    with pytest.raises(RegistryAuthError, match=f"refused the credentials of '{USER}'"):
        pull(ref, store=store)
    monkeypatch.delenv("REGISTRY_AUTH_FILE")
    config_dir = no_credentials / "docker-config"
    config_dir.mkdir()
    write_auth(config_dir / "config.json", f"http://{auth_registry.address}", USER, PASSWORD)
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    build = pull(ref, store=store)
    assert_same_tree(build, images.layout, "small")


def test_bearer_token_flow_survives_5xx_and_dropped_connections(
    images: Images, store: ImageCache, no_credentials: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    behaviour = Behaviour(blob_errors=2, blob_drops=2)
    with fake_registry(images.layout, behaviour) as address:
        monkeypatch.setenv(
            "REGISTRY_AUTH_FILE",
            str(write_auth(no_credentials / "a.json", address, behaviour.user, behaviour.password)),
        )
        build = pull(f"{address}/fake/small:small", store=store)
    assert behaviour.token_requests and set(behaviour.token_requests) == {behaviour.user}
    assert behaviour.blob_errors == 0 and behaviour.blob_drops == 0  # the faults did happen
    assert_same_tree(build, images.layout, "small")


def test_bearer_token_refused(
    images: Images, store: ImageCache, no_credentials: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fake_registry(images.layout, Behaviour()) as address:
        monkeypatch.setenv(
            "REGISTRY_AUTH_FILE", str(write_auth(no_credentials / "a.json", address, "fake-user", "bad"))
        )
        with pytest.raises(RegistryAuthError, match="token service refused the credentials of 'fake-user'"):
            pull(f"{address}/fake/small:small", store=store)


def test_a_blob_that_keeps_ending_early_is_truncated(
    images: Images, store: ImageCache, no_credentials: Path
) -> None:
    with fake_registry(images.layout, Behaviour(blob_drops=100)) as address:
        path = no_credentials / "a.json"
        write_auth(path, address, "fake-user", "fake-pw")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("REGISTRY_AUTH_FILE", str(path))
            with pytest.raises(TruncatedBlob, match=r"small:small (config|layer).*transfer failed"):
                pull(f"{address}/fake/small:small", store=store)
    assert_nothing_left(store)


def _pushed_first_layer(
    registry: t.LocalRegistry, workspace: Path, tag: str
) -> tuple[str, dict[str, Any], Path]:
    """Push a fresh image; return its reference, its first layer's descriptor, and that blob's file in
    the registry's storage (for a test to damage)."""
    layout = workspace / f"{tag}-layout"
    unique_image(layout, tag)
    ref = f"{registry.address}/corrupt/{tag}:1"
    t.skopeo_copy(f"oci:{layout}:{tag}", f"docker://{ref}")
    manifest = json.loads((layout / "index.json").read_text())["manifests"][0]
    layer: dict[str, Any] = json.loads((layout / "blobs/sha256" / manifest["digest"][7:]).read_bytes())[
        "layers"
    ][0]
    return ref, layer, registry.blob_data(layer["digest"])


def test_corrupted_blob_in_the_registry_is_a_digest_mismatch(
    registry: t.LocalRegistry, workspace: Path, store: ImageCache, no_credentials: Path
) -> None:
    ref, layer, data = _pushed_first_layer(registry, workspace, "digest")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(DigestMismatch, match=f"content hashes to sha256:.*expected {layer['digest']}"):
        pull(ref, store=store)
    assert_nothing_left(store)
    assert not (store.blobs / "sha256" / layer["digest"][7:]).exists()


def test_truncated_blob_in_the_registry(
    registry: t.LocalRegistry, workspace: Path, store: ImageCache, no_credentials: Path
) -> None:
    ref, layer, data = _pushed_first_layer(registry, workspace, "truncated")
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(TruncatedBlob, match=f"ended after 100 of {layer['size']} bytes"):
        pull(ref, store=store)
    assert_nothing_left(store)


def test_unsupported_media_types(workspace: Path, store: ImageCache) -> None:
    layout = workspace / "unsupported-layout"
    writer = t.LayoutWriter(layout)
    layer = writer.layer(t.tar_bytes([t.file("x")]))
    bz = t.Blob("application/vnd.oci.image.layer.v1.tar+bzip2", layer.digest, layer.size, layer.diff_id)
    writer.image([bz], tag="bzip2")
    schema1 = writer.blob(
        json.dumps({"schemaVersion": 1, "name": "x", "tag": "1", "fsLayers": []}).encode(),
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    )
    writer.tag(schema1, "schema1")
    with pytest.raises(UnsupportedMediaType, match=r"layer 0 has unsupported media type '.*tar\+bzip2'"):
        pull(f"oci:{layout}:bzip2", store=store)
    with pytest.raises(UnsupportedMediaType, match="schema 1"):
        pull(f"oci:{layout}:schema1", store=store)
    assert_nothing_left(store)


def test_a_corrupt_local_blob_fails_inside_the_worker_with_its_type(
    workspace: Path, store: ImageCache
) -> None:
    layout = workspace / "local-corrupt"
    unique_image(layout, "local")
    manifest = json.loads((layout / "index.json").read_text())["manifests"][0]
    layer = json.loads((layout / "blobs/sha256" / manifest["digest"][7:]).read_bytes())["layers"][0]
    blob = layout / "blobs/sha256" / layer["digest"][7:]
    raw = bytearray(blob.read_bytes())
    raw[-20] ^= 0x01  # inside the gzip stream's data: decompression may or may not notice, the digest does
    blob.write_bytes(bytes(raw))
    with pytest.raises((DigestMismatch,)) as info:
        pull(f"oci:{layout}:local", store=store)
    assert layer["digest"][:19] in str(info.value)
    assert_nothing_left(store)
