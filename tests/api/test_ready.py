"""Readiness (`GET /v1/health?ready=true`, no key): 200 on a daemon that can serve creates, 503 naming
the failed check when the store stops answering or no template snapshot is usable."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tartarus.daemon.app import create_app
from tartarus.daemon.config import DaemonConfig
from tartarus.paths import cache_dir
from tests.api.conftest import Api, backend_url, env, tcp_daemon

CHECKS = ["store", "state_dir", "guest", "snapshot"]


def _failed(response: httpx.Response) -> set[str]:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "not_ready"
    assert [c["name"] for c in error["checks"]] == CHECKS
    failed = {c["name"] for c in error["checks"] if not c["ok"]}
    for name in failed:
        assert f"{name}: " in error["message"]
    return failed


def test_a_working_daemon_is_ready_without_a_key(api: Api) -> None:
    response = httpx.get(f"{api.url}/v1/health", params={"ready": "true"}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ready"] is True
    assert [(c["name"], c["ok"]) for c in body["checks"]] == [(name, True) for name in CHECKS]
    # Plain liveness stays as it was: no readiness fields.
    plain = httpx.get(f"{api.url}/v1/health", timeout=30).json()
    assert "ready" not in plain and "checks" not in plain


def test_not_ready_without_a_template_snapshot(api: Api, tmp_path: Path) -> None:
    """A cache with the guest kernel and initramfs but no template: creates could only fail."""
    for part in ("kernel", "initramfs"):
        os.symlink(cache_dir() / part, tmp_path / part)
    with env(TARTARUS_CACHE_DIR=str(tmp_path)):
        response = httpx.get(f"{api.url}/v1/health", params={"ready": "true"}, timeout=30)
    assert _failed(response) == {"snapshot"}
    assert "tartarus template build" in response.json()["error"]["message"]
    # Nor without the guest kernel.
    with env(TARTARUS_CACHE_DIR=str(tmp_path / "empty")):
        response = httpx.get(f"{api.url}/v1/health", params={"ready": "true"}, timeout=30)
    assert _failed(response) == {"guest", "snapshot"}


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str | None:
    return backend_url(request)


def test_not_ready_when_the_store_does_not_answer(database: str | None, tmp_path: Path) -> None:
    app = create_app(tmp_path, DaemonConfig(pool_size=0))
    with tcp_daemon(tmp_path, database, app) as url:
        assert httpx.get(f"{url}/v1/health", params={"ready": "true"}, timeout=30).status_code == 200
        app.state.control.store.db.close()  # the connection is gone: every query now fails
        response = httpx.get(f"{url}/v1/health", params={"ready": "true"}, timeout=30)
        assert _failed(response) == {"store"}
        assert httpx.get(f"{url}/v1/health", timeout=30).status_code == 200  # still alive
