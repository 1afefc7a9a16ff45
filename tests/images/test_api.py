"""The images REST API against Debian's docker-registry on loopback: list, pull (convert) and delete
through a real daemon, the conversion metric, admin-only pulls, and a clear 4xx/502 — never a 500 — for
every way a pull fails, with nothing published."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tartarus.daemon.app import create_app
from tartarus.daemon.config import DaemonConfig
from tartarus.images import registry as registry_module
from tartarus.images import testing as t
from tartarus.images.api import to_template
from tartarus.images.cache import ImageCache
from tartarus.templates.built import register_template
from tests.api.conftest import env, tcp_daemon
from tests.images.conftest import PASSWORD, USER, Images
from tests.images.test_registry import _pushed_first_layer


@dataclass
class Daemon:
    url: str
    state: Path
    admin_key: str
    images: ImageCache

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=300)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    state = tmp_path_factory.mktemp("images-api")
    images = ImageCache(state / "images")  # private: the test leaves nothing in the shared cache
    app = create_app(state, DaemonConfig(pool_size=0, image_root=images.root))
    with tcp_daemon(state, None, app) as url:
        yield Daemon(url, state, (state / "admin.key").read_text().strip(), images)


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No registry credentials anywhere; retries without backoff (the daemon runs in this process)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.setattr(registry_module, "BACKOFF_S", 0.0)


def _convert_count(daemon: Daemon, cache: str) -> float:
    with daemon.client() as c:
        text = c.get("/metrics").text
    prefix = f'tartarus_image_convert_seconds_count{{cache="{cache}"}} '
    (line,) = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(line.removeprefix(prefix))


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text
    return str(response.json()["error"]["message"])


def test_pull_list_and_delete(daemon: Daemon, images: Images, no_credentials: None) -> None:
    misses, hits = _convert_count(daemon, "miss"), _convert_count(daemon, "hit")
    with daemon.client() as c:
        first = c.post("/v1/images", json={"reference": images.small})
        assert first.status_code == 201, first.text
        info = first.json()
        assert info["digest"].startswith("sha256:") and info["references"] == [images.small]
        assert info["fstype"] == "ext4" and info["platform"] == "linux/amd64" and info["size"] > 0
        assert info["layers"] == 2
        again = c.post("/v1/images", json={"reference": f"docker://{images.small}"})
        assert again.status_code == 200 and again.json()["digest"] == info["digest"]
        assert _convert_count(daemon, "miss") == misses + 1 and _convert_count(daemon, "hit") == hits + 1

        listed = c.get("/v1/images").json()["images"]
        assert [i["digest"] for i in listed] == [info["digest"]]
        audit = c.get("/v1/audit", params={"limit": 5}).json()["entries"]
        assert any(e["action"] == "POST /v1/images" and e["target"] == info["digest"] for e in audit)

        assert c.delete(f"/v1/images/{info['digest']}").status_code == 204
        assert c.get("/v1/images").json() == {"images": []}
        _error(c.delete(f"/v1/images/{info['digest']}"), 404, "not_found")
        _error(c.delete("/v1/images/sha256:nothex"), 400, "invalid_argument")


def test_an_image_a_template_boots_from_is_not_deleted(
    daemon: Daemon, images: Images, no_credentials: None, tmp_path: Path
) -> None:
    with daemon.client() as c:
        digest = c.post("/v1/images", json={"reference": images.docker}).json()["digest"]
    (build,) = [b for b in daemon.images.all() if b.manifest_digest == digest]
    with env(TARTARUS_CACHE_DIR=str(tmp_path)):  # a private template registry, seen by the daemon
        register_template(to_template(build, "from-image"))
        with daemon.client() as c:
            message = _error(c.delete(f"/v1/images/{digest}"), 409, "conflict")
    assert "from-image" in message
    assert build.rootfs.exists()


def test_tenants_list_images_but_cannot_pull_or_delete(daemon: Daemon, images: Images) -> None:
    with daemon.client() as c:
        key = c.post("/v1/keys", json={"tenant": "img-user"}).json()["key"]
    with daemon.client(key) as c:
        assert c.get("/v1/images").status_code == 200
        _error(c.post("/v1/images", json={"reference": images.small}), 403, "forbidden")
        _error(c.delete(f"/v1/images/sha256:{'0' * 64}"), 403, "forbidden")


def test_every_failed_pull_is_a_clear_client_or_gateway_error(
    daemon: Daemon,
    images: Images,
    auth_registry: t.LocalRegistry,
    registry: t.LocalRegistry,
    workspace: Path,
    no_credentials: None,
) -> None:
    before = {b.manifest_digest for b in daemon.images.all()}
    private = f"{auth_registry.address}/private/small:1"
    t.skopeo_copy(f"oci:{images.layout}:small", f"docker://{private}", creds=f"{USER}:{PASSWORD}")
    corrupt, _, data = _pushed_first_layer(registry, workspace, "api-corrupt")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    cases = [
        ("Not A Reference!", 400, "invalid_argument", "invalid"),
        (f"oci:{images.layout}:small", 400, "invalid_argument", "registries only"),
        (f"docker-archive:{workspace}/x.tar", 400, "invalid_argument", "registries only"),
        (f"{registry.address}/test/small:nope", 404, "not_found", "not found"),
        (f"127.0.0.1:{t.free_port()}/test/small:1", 502, "registry_error", "unreachable"),
        (private, 502, "registry_error", "refused access"),  # not 401: the caller's key is fine
        (corrupt, 422, "invalid_image", "content hashes to"),
    ]
    with daemon.client() as c:
        for reference, status, code, words in cases:
            message = _error(c.post("/v1/images", json={"reference": reference}), status, code)
            assert words in message, (reference, message)
        body = {"reference": images.multi, "platform": "linux/s390x"}  # an index without it
        _error(c.post("/v1/images", json=body), 404, "not_found")
        _error(
            c.post("/v1/images", json={"reference": images.small, "fstype": "xfs"}), 400, "invalid_argument"
        )
    assert {b.manifest_digest for b in daemon.images.all()} == before  # nothing half-made was published
    assert not list(daemon.images.tmp.iterdir())
