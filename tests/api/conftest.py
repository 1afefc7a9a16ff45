"""A real daemon per backend (SQLite file, PostgreSQL server) for the control plane's API tests."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from tartarus.daemon.app import create_app
from tartarus.daemon.config import DaemonConfig
from tartarus.daemon.server import GRACE_S


@dataclass
class Api:
    """A running daemon: its TCP base URL, state dir and local admin key."""

    url: str
    state: Path
    admin_key: str
    backend: str
    database_url: str | None = None

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def new_key(self, tenant: str, *, admin: bool = False) -> str:
        with self.client(self.admin_key) as c:
            response = c.post("/v1/keys", json={"tenant": tenant, "admin": admin})
            response.raise_for_status()
            return str(response.json()["key"])


@contextlib.contextmanager
def env(**values: str | None) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def tcp_daemon(state: Path, database_url: str | None, app: FastAPI | None = None) -> Iterator[str]:
    """The daemon's app (default: a new one for `state`) under uvicorn on 127.0.0.1 (a free port), from
    a thread; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = app or create_app(state, DaemonConfig(pool_size=0))
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=GRACE_S,  # a fuzzed create still booting must not hold the stop
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="tartarus-test-daemon", daemon=True)
    with env(TARTARUS_DATABASE_URL=database_url):
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive(), "daemon failed to start"
            assert time.monotonic() < deadline, "daemon did not start within 30 s"
            time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        assert not thread.is_alive(), "the daemon did not stop (its sandboxes would be left behind)"


def backend_url(request: pytest.FixtureRequest) -> str | None:
    """None (the state dir's SQLite file) or a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return None
    import secrets

    from tests.pg import fresh_database

    return fresh_database(request.getfixturevalue("postgres_server_url"), "t_" + secrets.token_hex(8))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    state = tmp_path_factory.mktemp(f"api-{request.param}")
    database_url = backend_url(request)
    with tcp_daemon(state, database_url) as url:
        yield Api(url, state, (state / "admin.key").read_text().strip(), request.param, database_url)
