"""The API's defences against callers on the host (issue 14): operator-only verdicts, no body read
before the key, bounded bodies and listings, a private socket, no audit lines for anonymous calls, and
errors and listings that do not show host paths to tenants. Each runs against a real daemon."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import websockets
from websockets.sync.client import connect

from tartarus.daemon.app import create_app
from tartarus.daemon.config import DaemonConfig
from tartarus.daemon.routes import templates as templates_routes
from tartarus.daemon.server import daemon_thread
from tartarus.images import testing as t
from tartarus.images.api import pull
from tartarus.images.cache import ImageCache
from tartarus.sdk import Sandbox
from tests.api.conftest import tcp_daemon
from tests.conftest import wait_until

TARTARUS = os.path.join(os.path.dirname(sys.executable), "tartarus")
# Bounds a hang, not a wait for work: a refusal from the headers comes back in milliseconds; the old
# daemon waited for a body that never came.
PROMPT_S = 30
MiB = 1 << 20


@dataclass
class Daemon:
    url: str
    state: Path
    admin_key: str

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def new_key(self, tenant: str, *, admin: bool = False) -> tuple[str, str]:
        """A new key's (id, secret)."""
        with self.client(self.admin_key) as c:
            response = c.post("/v1/keys", json={"tenant": tenant, "admin": admin})
            response.raise_for_status()
            return str(response.json()["id"]), str(response.json()["key"])

    def audit_lines(self) -> list[str]:
        path = self.state / "audit.log"
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    state = tmp_path_factory.mktemp("hardening")
    with tcp_daemon(state, None) as url:
        yield Daemon(url, state, (state / "admin.key").read_text().strip())


# ---- 1: quarantine and release are operator actions ---------------------------------------------


@pytest.mark.vm
def test_only_an_admin_can_quarantine_or_release_and_the_record_names_who(daemon: Daemon) -> None:
    _, tenant_key = daemon.new_key("suspect")
    ops_id, ops_key = daemon.new_key("ops", admin=True)
    with (
        Sandbox.create("python-ds", url=daemon.url, api_key=tenant_key) as sb,
        daemon.client(tenant_key) as own,
    ):
        path = f"/v1/sandboxes/{sb.id}"
        refused = own.post(f"{path}/quarantine", json={"reason": "self-inflicted"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        with daemon.client(ops_key) as ops:
            confined = ops.post(f"{path}/quarantine", json={"reason": "port scan"})
            assert confined.status_code == 200 and confined.json()["quarantined"], confined.text
            # The tenant whose sandbox it is cannot lift the verdict.
            lifted = own.post(f"{path}/release")
            assert lifted.status_code == 403 and lifted.json()["error"]["code"] == "forbidden"
            assert ops.get(path).json()["quarantined"] is True
            released = ops.post(f"{path}/release")
            assert released.status_code == 200 and released.json()["quarantined"] is False
    entries = [json.loads(line) for line in daemon.audit_lines()]
    verdicts = {e["action"]: e for e in entries if e.get("sandbox") == sb.id and "by" in e}
    assert verdicts["sandbox.quarantine"]["by"] == f"operator:{ops_id}@ops"
    assert verdicts["sandbox.release"]["by"] == f"operator:{ops_id}@ops"


# ---- 2: the key before the body; bounded bodies; a private socket ---------------------------------


def _partial_request(
    url: str, method: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, bytes]:
    """Send a request whose body may be shorter than its Content-Length says (the rest never comes);
    return the status and body of the answer, or fail if none comes within PROMPT_S."""
    where = urlsplit(url)
    assert where.hostname is not None and where.port is not None
    with socket.create_connection((where.hostname, where.port), timeout=PROMPT_S) as s:
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: {where.hostname}",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"connection closed without an answer: {data!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        assert found, head
        while len(rest) < int(found.group(1)):
            chunk = s.recv(65536)
            assert chunk, "connection closed mid-answer"
            rest += chunk
    return int(head.split()[1]), rest


def _code(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


def test_a_keyless_request_is_refused_before_its_body_is_read(daemon: Daemon) -> None:
    """One anonymous POST declaring a gigabyte: answered 401 from its headers, without waiting for
    (or holding) the body."""
    for auth in ({}, {"Authorization": "Bearer tartarus_not-a-key"}, {"Authorization": "Basic eDp5"}):
        headers = {**auth, "Content-Type": "application/json", "Content-Length": str(1 << 30)}
        status, body = _partial_request(daemon.url, "POST", "/v1/sandboxes", headers, b'{"template": ')
        assert status == 401 and _code(body) == "unauthorized", (auth, body)


def test_an_oversized_json_body_is_refused_with_413(daemon: Daemon) -> None:
    _, key = daemon.new_key("big-bodies")
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    # Declared too large: refused before a byte of it is read.
    status, body = _partial_request(
        daemon.url, "POST", "/v1/sandboxes", {**auth, "Content-Length": str(2 * MiB)}, b"{"
    )
    assert status == 413 and _code(body) == "payload_too_large", body

    # Undeclared (chunked): refused once more than the limit has arrived.
    def chunks() -> Iterator[bytes]:
        yield b'{"template": "python-ds", "env": {"X": "'
        for _ in range(3):
            yield b"x" * MiB
        yield b'"}}'

    with daemon.client(key) as c:
        response = c.post("/v1/sandboxes", content=chunks(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
        assert "1 MiB" in response.json()["error"]["message"]
        # Under the limit a body is read as before (an unknown template: 404, not 413).
        small = c.post("/v1/sandboxes", json={"template": "no-such-template", "env": {"X": "x" * (MiB // 2)}})
        assert small.status_code == 404, small.text


def test_exec_bodies_and_uploads_keep_their_own_limits(daemon: Daemon) -> None:
    """A command's stdin may exceed the default limit (up to the agent's 16 MiB); an upload streams
    and is never held whole, so its declared size is not refused."""
    missing = "sb-000000000000"
    with daemon.client(daemon.admin_key) as c:
        stdin = "A" * (2 * MiB)  # base64 of 1.5 MiB
        response = c.post(f"/v1/sandboxes/{missing}/exec", json={"argv": ["cat"], "stdin": stdin})
        assert response.status_code == 404, response.text  # read whole, then: no such sandbox
    headers = {"Authorization": f"Bearer {daemon.admin_key}", "Content-Length": str(64 * MiB)}
    status, body = _partial_request(
        daemon.url, "PUT", f"/v1/sandboxes/{missing}/files?path=/tmp/x", headers, b"xx"
    )
    assert status == 404 and _code(body) == "not_found", body


def test_the_api_socket_is_private_to_the_daemon_user(tmp_path: Path) -> None:
    """uvicorn's own unix socket is 0666: any local user could call the API and send it bodies."""
    state = tmp_path / "embedded"
    uds = state / "api.sock"
    state.mkdir()
    with daemon_thread(state, uds, DaemonConfig(pool_size=0)):
        assert stat.S_IMODE(uds.stat().st_mode) == 0o600
        transport = httpx.HTTPTransport(uds=str(uds))
        with httpx.Client(transport=transport, base_url="http://daemon", timeout=PROMPT_S) as c:
            assert c.get("/v1/health").status_code == 200

    served = tmp_path / "served"
    sock = tmp_path / "run" / "api.sock"
    env = {**os.environ, "TARTARUS_STATE_DIR": str(served), "TARTARUS_POOL_SIZE": "0"}
    process = subprocess.Popen(
        [TARTARUS, "serve", "--socket", str(sock)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        assert wait_until(lambda: sock.exists() or process.poll() is not None, 60), "no socket"
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, base_url="http://daemon", timeout=PROMPT_S) as c:
            assert c.get("/v1/health").status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)


# ---- 7: only authenticated callers are audited ---------------------------------------------------


def test_anonymous_requests_leave_no_audit_trail(daemon: Daemon) -> None:
    key_id, key = daemon.new_key("audited")
    before = daemon.audit_lines()
    long_path = "/v1/" + "x" * 4000
    statuses = []
    for secret in (None, "tartarus_not-a-key"):
        with daemon.client(secret) as c:
            for method, path in (
                ("POST", long_path),
                ("POST", "/v1/sandboxes"),
                ("DELETE", "/v1/sandboxes/sb-000000000000"),
                ("PUT", "/v1/tenants/audited/quota"),
            ):
                statuses.append(c.request(method, path, json={}).status_code)
    with pytest.raises(websockets.InvalidStatus) as refused:
        connect(
            daemon.url.replace("http://", "ws://") + "/v1/sandboxes/sb-000000000000/pty",
            open_timeout=PROMPT_S,
        )
    statuses.append(refused.value.response.status_code)
    assert daemon.audit_lines() == before
    with daemon.client(daemon.admin_key) as admin:
        entries = admin.get("/v1/audit", params={"limit": 100}).json()["entries"]
    assert not [
        e
        for e in entries
        if e.get("actor") in (None, "anonymous")
        and e["action"].startswith(("POST", "PUT", "DELETE", "WEBSOCKET"))
    ]
    assert statuses == [401] * len(statuses)  # refused before routing: no path is seen to exist

    # What an authenticated caller does is audited, refused or not, with who did it.
    with daemon.client(key) as c:
        assert c.post(long_path, json={}).status_code == 404
    [line] = daemon.audit_lines()[len(before) :]
    entry = json.loads(line)
    assert entry["actor"] == key_id and entry["tenant"] == "audited" and entry["status"] == 404


# ---- 8: errors and image listings keep host paths from tenants; listings are bounded -------------


def test_an_internal_error_names_the_request_not_the_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret_path = f"{tmp_path}/cache/secret-template"

    def broken() -> list[object]:
        raise OSError(f"cannot read {secret_path}")

    monkeypatch.setattr(templates_routes, "list_templates", broken)  # a fault injected into a real daemon
    state = tmp_path / "state"
    with tcp_daemon(state, None) as url:
        daemon = Daemon(url, state, (state / "admin.key").read_text().strip())
        _, key = daemon.new_key("errors")
        with daemon.client(key) as c:
            response = c.get("/v1/templates", headers={"X-Request-ID": "trace-500"})
    assert response.status_code == 500 and secret_path not in response.text
    assert response.headers["x-request-id"] == "trace-500"
    message = "internal error (request trace-500): see the daemon's log"
    assert response.json() == {"error": {"code": "internal", "message": message}}
    # The operator still has it whole.
    logged = [r for r in caplog.records if r.exc_info and secret_path in str(r.exc_info[1])]
    assert logged, "the exception was not logged"


def test_image_listing_shows_host_paths_to_admins_only(tmp_path: Path) -> None:
    """A local source's reference (`oci:/host/path`) and the warnings naming it are an admin's to see."""
    layout = tmp_path / "layout"
    writer = t.LayoutWriter(layout)
    # An AUFS metadata entry is ignored with a warning that names the layer, and so the layout's path.
    layer = writer.layer(
        t.tar_bytes([t.directory("etc"), t.file("etc/hostname", b"box\n"), t.file(".wh..wh.plnk")])
    )
    writer.image([layer], tag="odd")
    images = ImageCache(tmp_path / "images")  # private: nothing lands in the shared cache
    reference = f"oci:{layout}:odd"
    build = pull(reference, store=images)
    assert any(str(layout) in w for w in build.warnings), build.warnings

    state = tmp_path / "state"
    app = create_app(state, DaemonConfig(pool_size=0, image_root=images.root))
    with tcp_daemon(state, None, app) as url:
        daemon = Daemon(url, state, (state / "admin.key").read_text().strip())
        _, key = daemon.new_key("viewer")
        with daemon.client(daemon.admin_key) as c:
            [admin_view] = c.get("/v1/images").json()["images"]
        with daemon.client(key) as c:
            response = c.get("/v1/images")
    assert admin_view["references"] == [reference]
    assert any(str(layout) in w for w in admin_view["warnings"])
    [tenant_view] = response.json()["images"]
    assert tenant_view["digest"] == admin_view["digest"] and tenant_view["references"] == []
    assert tenant_view["warnings"] and str(tmp_path) not in response.text


@pytest.mark.vm
def test_a_directory_listing_is_bounded(daemon: Daemon) -> None:
    _, key = daemon.new_key("lister")
    with Sandbox.create("python-ds", url=daemon.url, api_key=key) as sb, daemon.client(key) as c:
        sb.commands.run("mkdir /tmp/many && cd /tmp/many && touch a b c d e f")
        url = f"/v1/sandboxes/{sb.id}/files/list"
        capped = c.get(url, params={"path": "/tmp/many", "limit": 5}).json()
        assert len(capped["entries"]) == 5 and capped["truncated"] is True
        whole = c.get(url, params={"path": "/tmp/many", "limit": 6}).json()
        assert [e["name"] for e in whole["entries"]] == list("abcdef") and whole["truncated"] is False
        assert c.get(url, params={"path": "/tmp/many"}).json()["truncated"] is False  # default: 10,000
        too_many = c.get(url, params={"path": "/tmp/many", "limit": 10_001})
        assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "invalid_argument"
