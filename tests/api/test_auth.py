"""Keys and roles: nothing but health answers without a valid key; tenant keys cannot administer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest
import websockets
from fastapi.routing import APIRoute, APIWebSocketRoute, iter_route_contexts
from starlette.routing import Route
from websockets.sync.client import connect

from tartarus.daemon.app import create_app
from tartarus.sdk import Sandbox
from tests.api.conftest import Api

TARTARUS = os.path.join(os.path.dirname(sys.executable), "tartarus")


def _operations(api: Api) -> list[tuple[str, str]]:
    """Every (method, path) the app routes, from its route table (not the OpenAPI document, which
    leaves some out), with path parameters filled in: a new route is covered without editing this.
    A WebSocket route's method is "WEBSOCKET"."""
    ops = []
    for route in iter_route_contexts(create_app(api.state).routes):  # included routers' too
        kind = type(route.original_route).__name__
        assert route.path, route
        concrete = re.sub(r"\{[^}]+\}", "sb-000000000000", route.path)
        if isinstance(route.original_route, APIWebSocketRoute):
            ops.append(("WEBSOCKET", concrete))
            continue
        assert isinstance(route.original_route, APIRoute | Route), f"teach this test to call a {kind}"
        assert route.methods, route
        ops += [(method, concrete) for method in sorted(route.methods) if method != "HEAD"]
    return ops


def _refused_handshake(api: Api, path: str) -> tuple[int, dict[str, Any]]:
    """Open a WebSocket without a key; return the HTTP status and error body it was refused with."""
    with pytest.raises(websockets.InvalidStatus) as refused:
        connect(api.url.replace("http://", "ws://") + path, open_timeout=30)
    response = refused.value.response
    return response.status_code, json.loads(response.body or b"{}")


def test_only_health_answers_without_a_key(api: Api) -> None:
    ops = _operations(api)
    assert ("GET", "/v1/openapi.json") in ops and ("GET", "/metrics") in ops
    assert ("WEBSOCKET", "/v1/sandboxes/sb-000000000000/pty") in ops
    with api.client(None) as c:
        assert c.get("/v1/health").status_code == 200
        assert c.get("/v1/health", params={"ready": "true"}).status_code == 200
        for method, path in ops:
            if path == "/v1/health":
                continue
            if method == "WEBSOCKET":
                status, body = _refused_handshake(api, path)
                assert status == 401, f"WEBSOCKET {path} answered {status}"
                assert body["error"]["code"] == "unauthorized"
                continue
            response = c.request(method, path, params={"path": "/tmp"})
            assert response.status_code == 401, f"{method} {path} answered {response.status_code}"
            assert response.json()["error"]["code"] == "unauthorized"
        # FastAPI's default document and docs pages are not served at all.
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert c.get(path).status_code in (401, 404), path


def test_the_openapi_document_is_served_to_key_holders(api: Api) -> None:
    key = api.new_key("reader")
    with api.client(key) as c:
        response = c.get("/v1/openapi.json")
    assert response.status_code == 200
    assert response.json() == create_app(api.state).openapi()


def test_a_wrong_or_malformed_key_is_refused(api: Api) -> None:
    for key in ("tartarus_" + "A" * 43, "nonsense", "x" * 5000):
        with api.client(key) as c:
            response = c.get("/v1/sandboxes")
            assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"


def test_tenant_keys_cannot_administer(api: Api) -> None:
    key = api.new_key("acme")
    with api.client(key) as c:
        assert c.get("/v1/sandboxes").json() == {"sandboxes": []}
        for method, path, body in (
            ("POST", "/v1/keys", {"tenant": "acme", "admin": True}),
            ("GET", "/v1/keys", None),
            ("GET", "/v1/tenants", None),
            ("PUT", "/v1/tenants/acme/quota", {"max_sandboxes": 100}),
            ("GET", "/v1/audit", None),
            ("GET", "/metrics", None),
        ):
            response = c.request(method, path, json=body)
            assert response.status_code == 403, (method, path, response.text)
            assert response.json()["error"]["code"] == "forbidden"
        # A tenant sees its own quota, and no other tenant's (not even whether it exists).
        assert c.get("/v1/tenants/acme").json()["name"] == "acme"
        assert c.get("/v1/tenants/local").status_code == 404


# Every route is either an operator's or open to tenant keys (which then see only their own): a new route
# must be put in one of these two sets, so an admin-only route cannot lose its guard unnoticed.
ADMIN_ONLY = {
    ("POST", "/v1/keys"),
    ("GET", "/v1/keys"),
    ("DELETE", "/v1/keys/{key_id}"),
    ("GET", "/v1/tenants"),
    ("PUT", "/v1/tenants/{tenant}/quota"),
    ("GET", "/v1/audit"),
    ("GET", "/metrics"),
    ("POST", "/v1/images"),
    ("DELETE", "/v1/images/{digest}"),
    ("POST", "/v1/gc"),
    ("POST", "/v1/sandboxes/{sandbox_id}/quarantine"),
    ("POST", "/v1/sandboxes/{sandbox_id}/release"),
}
TENANT_ROUTES = {
    ("GET", "/v1/health"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/v1/templates"),
    ("GET", "/v1/tenants/{tenant}"),  # its own only
    ("GET", "/v1/images"),  # without host paths
    ("POST", "/v1/sandboxes"),
    ("GET", "/v1/sandboxes"),
    ("GET", "/v1/checkpoints"),
    ("GET", "/v1/checkpoints/{checkpoint_id}"),
    ("DELETE", "/v1/checkpoints/{checkpoint_id}"),
    ("POST", "/v1/checkpoints/{checkpoint_id}/sandboxes"),
    *(
        (method, "/v1/sandboxes/{sandbox_id}" + tail)
        for method, tail in (
            ("GET", ""),
            ("DELETE", ""),
            ("PUT", "/timeout"),
            ("POST", "/hibernate"),
            ("POST", "/wake"),
            ("POST", "/checkpoints"),
            ("POST", "/fork"),
            ("POST", "/ports"),
            ("DELETE", "/ports/{port}"),
            ("POST", "/exec"),
            ("WEBSOCKET", "/pty"),
            ("POST", "/code"),
            ("POST", "/code/contexts"),
            ("GET", "/code/contexts"),
            ("POST", "/code/contexts/{context_id}/restart"),
            ("DELETE", "/code/contexts/{context_id}"),
            ("GET", "/metrics"),
            ("GET", "/files"),
            ("PUT", "/files"),
            ("DELETE", "/files"),
            ("GET", "/files/list"),
            ("GET", "/files/stat"),
            ("POST", "/files/mkdir"),
            ("POST", "/files/rename"),
            ("GET", "/files/watch"),
            ("POST", "/processes"),
            ("GET", "/processes"),
            ("GET", "/processes/{pid}/stream"),
            ("POST", "/processes/{pid}/stdin"),
            ("POST", "/processes/{pid}/signal"),
            ("POST", "/processes/{pid}/resize"),
            ("POST", "/tokens"),  # its own sandbox's scoped tokens
        )
    ),
}


def _route_table(api: Api) -> set[tuple[str, str]]:
    ops = set()
    for route in iter_route_contexts(create_app(api.state).routes):
        assert route.path
        if isinstance(route.original_route, APIWebSocketRoute):
            ops.add(("WEBSOCKET", route.path))
        else:
            ops |= {(m, route.path) for m in route.methods or () if m != "HEAD"}
    return ops


def test_every_admin_route_refuses_a_tenant_key_even_on_its_own_sandbox(api: Api) -> None:
    table = _route_table(api)
    known = ADMIN_ONLY | TENANT_ROUTES
    assert table == known, f"routes to classify: {table - known}; gone: {known - table}"
    key = api.new_key("not-an-operator")
    with Sandbox.create("python-ds", url=api.url, api_key=key) as sb, api.client(key) as c:
        for method, template in sorted(ADMIN_ONLY):
            path = template.format(
                sandbox_id=sb.id, key_id="key-000000000000", tenant="not-an-operator", digest="sha256:00"
            )
            body = {
                "/v1/keys": {"tenant": "not-an-operator", "admin": True},
                "/v1/tenants/{tenant}/quota": {"max_sandboxes": 100},
                "/v1/images": {"reference": "registry.invalid/x:1"},
                "/v1/sandboxes/{sandbox_id}/quarantine": {"reason": "x"},
            }.get(template)
            response = c.request(method, path, json=body)
            assert response.status_code == 403, (method, path, response.text)
            assert response.json()["error"]["code"] == "forbidden"
        assert sb.refresh().quarantined is False


def test_revoked_key_stops_working_at_once(api: Api) -> None:
    key = api.new_key("acme")
    with api.client(api.admin_key) as admin:
        (listed,) = [
            k for k in admin.get("/v1/keys", params={"tenant": "acme"}).json()["keys"] if not k["revoked_at"]
        ][-1:]
        assert "key" not in listed  # listings never show secrets
        with api.client(key) as c:
            assert c.get("/v1/sandboxes").status_code == 200
            assert admin.delete(f"/v1/keys/{listed['id']}").status_code == 204
            assert c.get("/v1/sandboxes").status_code == 401


def test_cli_creates_lists_and_revokes_keys_on_the_daemons_store(api: Api) -> None:
    env = {**os.environ, "TARTARUS_STATE_DIR": str(api.state)}
    if api.database_url:
        env["TARTARUS_DATABASE_URL"] = api.database_url
    proc = subprocess.run(
        [TARTARUS, "keys", "create", "--tenant", "cli-made"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    key = proc.stdout.strip().splitlines()[-1]
    assert key.startswith("tartarus_") and " " not in key
    with api.client(key) as c:
        assert c.get("/v1/sandboxes").status_code == 200  # the running daemon accepts it at once
    listing = subprocess.run(
        [TARTARUS, "keys", "ls", "--tenant", "cli-made", "--json"], capture_output=True, text=True, env=env
    )
    (entry,) = json.loads(listing.stdout)
    assert entry["tenant"] == "cli-made" and entry["role"] == "user" and key not in listing.stdout
    revoke = subprocess.run(
        [TARTARUS, "keys", "revoke", entry["id"]], capture_output=True, text=True, env=env
    )
    assert revoke.returncode == 0, revoke.stderr
    with api.client(key) as c:
        assert c.get("/v1/sandboxes").status_code == 401
    bad = subprocess.run(
        [TARTARUS, "keys", "create", "--tenant", "Not Valid"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "tenant name" in bad.stderr and "Traceback" not in bad.stderr


def test_request_ids_are_echoed_or_made(api: Api) -> None:
    with api.client(api.admin_key) as c:
        assert (
            c.get("/v1/sandboxes", headers={"X-Request-ID": "trace-42"}).headers["x-request-id"] == "trace-42"
        )
        made = c.get("/v1/sandboxes", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{16}", made)


def test_state_changing_calls_are_audited(api: Api) -> None:
    with api.client(api.admin_key) as c:
        response = c.put(
            "/v1/tenants/audited/quota", json={"max_sandboxes": 3}, headers={"X-Request-ID": "aud-1"}
        )
        assert response.status_code == 200
        entries = c.get("/v1/audit", params={"limit": 5}).json()["entries"]
    (entry,) = [e for e in entries if e["request_id"] == "aud-1"]
    assert entry["action"] == "PUT /v1/tenants/{tenant}/quota" and entry["target"] == "audited"
    assert entry["tenant"] == "local" and entry["status"] == 200
    lines = [json.loads(line) for line in (api.state / "audit.log").read_text().splitlines()]
    assert any(e.get("request_id") == "aud-1" and e["max_sandboxes"] == 3 for e in lines)
