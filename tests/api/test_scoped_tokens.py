"""Sandbox-scoped credentials on a real daemon with real sandboxes (daemon/scoped.py): the token minted
for sandbox X opens X's insides and nothing else: not another sandbox of the same tenant, not another
tenant's, and no control-plane call, X's own included. This is what the E2B endpoint calls the daemon
with, so a fault in it cannot reach past the sandbox whose token the client presented."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tartarus.daemon.app import create_app
from tartarus.daemon.config import DaemonConfig
from tests.api.conftest import Api, tcp_daemon

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    state: Path = tmp_path_factory.mktemp("scoped")
    with tcp_daemon(state, None, create_app(state, DaemonConfig(pool_size=0))) as url:
        yield Api(url, state, (state / "admin.key").read_text().strip(), "sqlite")


def create(c: httpx.Client, template: str) -> str:
    made = c.post("/v1/sandboxes", json={"template": template})
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


def test_a_sandboxs_token_opens_its_insides_and_nothing_else(api: Api) -> None:
    alice, bob = api.new_key("alice"), api.new_key("bob")
    with api.client(alice) as a, api.client(bob) as b:
        x, y = create(a, "python-ds"), create(a, "base")
        z = create(b, "base")
        try:
            assert b.post(f"/v1/sandboxes/{x}/tokens").status_code == 404  # only for who may touch it
            tokens = a.post(f"/v1/sandboxes/{x}/tokens").json()
            assert tokens["sandbox_id"] == x
            assert a.post(f"/v1/sandboxes/{x}/tokens").json() == tokens  # the same on every call
            with api.client(tokens["data"]) as data, api.client(tokens["code"]) as code:
                ran = data.post(f"/v1/sandboxes/{x}/exec", json={"argv": ["echo", "inside"]})
                assert ran.status_code == 200 and "aW5zaWRlCg==" in ran.text  # "inside\n", base64
                assert data.get(f"/v1/sandboxes/{x}").json()["tenant"] == "alice"
                got = data.get(f"/v1/sandboxes/{x}/files", params={"path": "/etc/passwd"})
                assert got.status_code == 200 and got.text.startswith("root:")
                assert code.post(f"/v1/sandboxes/{x}/code", json={"code": "1+1"}).json()["result"] == "2"
                refused = [
                    (data, "POST", f"/v1/sandboxes/{y}/exec", {"argv": ["true"]}),  # alice's other one
                    (data, "POST", f"/v1/sandboxes/{z}/exec", {"argv": ["true"]}),  # bob's
                    (data, "GET", f"/v1/sandboxes/{z}", None),
                    (data, "GET", "/v1/sandboxes", None),  # the control plane
                    (data, "POST", "/v1/sandboxes", {"template": "base"}),
                    (data, "DELETE", f"/v1/sandboxes/{x}", None),  # even of its own sandbox
                    (data, "PUT", f"/v1/sandboxes/{x}/timeout", {"timeout": 5}),
                    (data, "POST", f"/v1/sandboxes/{x}/hibernate", None),
                    (data, "POST", f"/v1/sandboxes/{x}/fork", {}),
                    (data, "POST", f"/v1/sandboxes/{x}/tokens", None),
                    (data, "POST", "/v1/keys", {"tenant": "alice"}),
                    (
                        code,
                        "POST",
                        f"/v1/sandboxes/{x}/exec",
                        {"argv": ["true"]},
                    ),  # code: the interpreter only
                    (code, "GET", f"/v1/sandboxes/{x}/files", None),
                ]
                for client, method, path, body in refused:
                    response = client.request(method, path, json=body)
                    assert response.status_code == 403, (method, path, response.text)
                    assert response.json()["error"]["code"] == "forbidden"
                forged = tokens["data"][:-4] + ("AAAA" if not tokens["data"].endswith("AAAA") else "BBBB")
                with api.client(forged) as f:
                    assert f.get(f"/v1/sandboxes/{x}").status_code == 401
                with api.client(tokens["data"].replace(f".{x}.", f".{y}.")) as moved:
                    assert moved.get(f"/v1/sandboxes/{y}").status_code == 401  # X's mac is not Y's
            assert a.delete(f"/v1/sandboxes/{x}").status_code == 204
            with api.client(tokens["data"]) as data:
                assert data.post(f"/v1/sandboxes/{x}/exec", json={"argv": ["true"]}).status_code == 404
        finally:
            for client, sid in ((a, x), (a, y), (b, z)):
                client.delete(f"/v1/sandboxes/{sid}")
