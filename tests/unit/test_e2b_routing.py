"""The E2B endpoint's front door (tartarus.e2b.app, routing, tokens), with a stand-in daemon: which plane
a request reaches, and that a data-plane request without its sandbox's token reaches nothing. The
endpoint on a real daemon with real sandboxes is tests/e2b_compat/test_sdk.py."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tartarus.daemon.scoped import SandboxTokens
from tartarus.e2b import connect
from tartarus.e2b.app import E2BApp
from tartarus.e2b.control import e2b_form, tartarus_key
from tartarus.e2b.layer import Layer
from tartarus.e2b.routing import RoutingError, Target, target
from tartarus.e2b.upstream import Upstream


class Mint:
    """Tokens as the daemon mints them (daemon/scoped.py) for its tenant alice's sandboxes: the stand-in
    daemon checks none (the endpoint only matches them to the routed sandbox; the daemon verifies)."""

    def __init__(self) -> None:
        self._tokens = SandboxTokens(secrets.token_bytes(32))

    def token(self, sandbox_id: str) -> str:
        return self._tokens.mint("data", sandbox_id, "alice")

    def traffic_token(self, sandbox_id: str) -> str:
        return self._tokens.mint("code", sandbox_id, "alice")


def test_headers_route_to_a_sandbox_and_its_port() -> None:
    assert target("sb-0123", "49983", "127.0.0.1:9") == Target("sb-0123", 49983)
    assert target("sb-0123", None, None) == Target("sb-0123", 49983)
    assert target(None, None, "49999-sb-0123.e2b.local:8080") == Target("sb-0123", 49999)
    assert target(None, None, "127.0.0.1:9") is None  # the control plane
    assert target(None, None, "api.e2b.local") is None
    for sandbox, port in (("../etc", None), ("sb-1", "0"), ("sb-1", "http"), ("", None)):
        with pytest.raises(RoutingError):
            target(sandbox, port, None)


class StandIn:
    """A daemon whose sandboxes are all gone, recording what reaches it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(f"{request.method} {request.url.path}")
        body = {"error": {"code": "not_found", "message": "no such sandbox"}}
        return httpx.Response(404, json=body)


@pytest.fixture
def endpoint(tmp_path: Path) -> tuple[E2BApp, StandIn, Mint]:
    (tmp_path / "admin.key").write_text("tartarus_node\n")
    daemon = StandIn()
    upstream = Upstream(url="http://daemon", transport=httpx.MockTransport(daemon))
    app = E2BApp(lambda: Layer(upstream))
    mint = Mint()
    app.install(Layer(upstream))
    return app, daemon, mint


def call(app: E2BApp, method: str, path: str, **kwargs: object) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:49983") as client:
            return await client.request(method, path, **kwargs)  # type: ignore[arg-type]

    return asyncio.run(go())


RPC = "/filesystem.Filesystem/Stat"


def sandbox(sid: str, token: str | None = None, port: int = 49983) -> dict[str, str]:
    headers = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": str(port), "Content-Type": "application/json"}
    return headers | ({"X-Access-Token": token} if token is not None else {})


def test_a_wrong_or_missing_token_is_401_and_reaches_nothing(
    endpoint: tuple[E2BApp, StandIn, Mint],
) -> None:
    app, daemon, mint = endpoint
    other = mint.token("sb-other")
    for headers in (sandbox("sb-1"), sandbox("sb-1", other), sandbox("sb-1", "x" * 43)):
        rpc = call(app, "POST", RPC, headers=headers, json={"path": "/"})
        assert rpc.status_code == 401
        assert rpc.json() == {"code": "unauthenticated", "message": rpc.json()["message"]}
        files = call(app, "GET", "/files", headers=headers, params={"path": "/etc/hostname"})
        assert files.status_code == 401 and files.json()["code"] == 401
    assert daemon.calls == []


def test_the_right_token_for_a_gone_sandbox_is_e2bs_502(endpoint: tuple[E2BApp, StandIn, Mint]) -> None:
    app, daemon, mint = endpoint
    headers = sandbox("sb-1", mint.token("sb-1"))
    for method, path, kwargs in (
        ("POST", RPC, {"json": {"path": "/"}}),
        ("GET", "/health", {}),
        ("GET", "/files", {"params": {"path": "/x"}}),
    ):
        response = call(app, method, path, headers=headers, **kwargs)
        assert response.status_code == 502, path
        assert "was not found" in response.json()["message"]  # what the SDK tells a dead sandbox by
    assert all(c.startswith(("GET /v1/sandboxes/sb-1", "POST", "GET")) for c in daemon.calls)
    assert len(daemon.calls) == 3


def test_bad_input_on_a_stream_ends_the_stream_with_an_error_not_a_500(
    endpoint: tuple[E2BApp, StandIn, Mint],
) -> None:
    app, daemon, mint = endpoint
    headers = sandbox("sb-1", mint.token("sb-1")) | {"Content-Type": "application/connect+json"}
    declared = b"\x00" + (connect.MAX_FRAME + 1).to_bytes(4, "big")
    sent = declared + b" " * (connect.MAX_FRAME + 1)  # refused once the cap is passed, not buffered on
    cases = [
        (b"\x00\x00\x00\x00\x09{}", "invalid_argument"),
        (declared, "resource_exhausted"),
        (sent, "resource_exhausted"),
    ]
    for body, code in cases:
        response = call(app, "POST", "/process.Process/Start", headers=headers, content=body)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/connect+json"
        (end,) = [response.content]
        assert end[0] == connect.END_STREAM
        assert json.loads(end[5:])["error"]["code"] == code
    assert daemon.calls == []  # refused before any command could start


def test_what_needs_new_guest_features_is_unimplemented(endpoint: tuple[E2BApp, StandIn, Mint]) -> None:
    app, daemon, mint = endpoint
    by_tag = {"process": {"tag": "web"}, "input": {"stdin": ""}}
    tagged = call(
        app, "POST", "/process.Process/SendInput", headers=sandbox("sb-1", mint.token("sb-1")), json=by_tag
    )
    assert tagged.status_code == 501 and daemon.calls == []
    other_port = call(app, "GET", "/", headers=sandbox("sb-1", mint.token("sb-1"), port=8080))
    assert other_port.status_code == 501 and daemon.calls == []


def test_the_control_plane_wants_a_key_and_answers_e2bs_errors(
    endpoint: tuple[E2BApp, StandIn, Mint],
) -> None:
    app, daemon, _ = endpoint
    missing = call(app, "GET", "/sandboxes/sb-1")
    assert missing.status_code == 401 and missing.json()["code"] == 401
    assert daemon.calls == []
    gone = call(app, "GET", "/sandboxes/sb-1", headers={"X-API-KEY": "tartarus_k"})
    assert gone.status_code == 404 and gone.json() == {"code": 404, "message": "no such sandbox"}
    bad = call(app, "POST", "/v2/sandboxes", headers={"X-API-KEY": "tartarus_k"}, json={"timeout": 5})
    assert bad.status_code == 400 and "templateID" in bad.json()["message"]


def test_control_calls_that_carry_routing_headers_reach_the_control_plane(
    endpoint: tuple[E2BApp, StandIn, Mint],
) -> None:
    """e2b 2.26 sends `E2b-Sandbox-Id` with its connect call to the API: with its API key, on a
    control-plane path, that is a control-plane call all the same; without a key it is envd's (401)."""
    app, daemon, _ = endpoint
    routed = {"E2b-Sandbox-Id": "sb-1", "E2b-Sandbox-Port": "49983"}
    gone = call(app, "POST", "/sandboxes/sb-1/connect", headers=routed | {"X-API-KEY": "tartarus_k"}, json={})
    assert gone.status_code == 404 and gone.json()["code"] == 404
    assert daemon.calls == ["GET /v1/sandboxes/sb-1"]
    keyless = call(app, "POST", "/sandboxes/sb-1/connect", headers=routed, json={})
    assert keyless.status_code == 401 and daemon.calls == ["GET /v1/sandboxes/sb-1"]


def test_keys_in_e2bs_form_are_the_tartarus_key_they_encode() -> None:
    """SDKs before 2.63 refuse a key that is not `e2b_` and hex: a Tartarus key in that form is itself."""
    key = "tartarus_" + "A-b_" * 10 + "xyz"
    assert re.fullmatch(r"e2b_[0-9a-f]+", e2b_form(key))
    assert tartarus_key(e2b_form(key)) == key
    assert tartarus_key(key) == key
    assert tartarus_key("e2b_ff00") == "e2b_ff00"  # not ASCII: no key in E2B's form, passed on as given
    assert tartarus_key("e2b_abc") == "e2b_abc"  # odd length: likewise


def test_listing_pages_filters_and_passes_metadata_as_labels(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def daemon(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        boxes = [
            {"id": f"sb-{n}", "template": "python-ds", "state": state, "created_at": 1000.0 + n, "vcpus": 1}
            | {"memory_mib": 512, "labels": {"team": "ml"}, "expires_at": 2000.0}
            for n, state in enumerate(["running", "hibernated", "running", "destroyed"])
        ]
        return httpx.Response(200, json={"sandboxes": boxes})

    (tmp_path / "admin.key").write_text("tartarus_node\n")
    upstream = Upstream(url="http://daemon", transport=httpx.MockTransport(daemon))
    app = E2BApp(lambda: Layer(upstream))
    app.install(Layer(upstream))
    key = {"X-API-KEY": "tartarus_k"}
    metadata = "team=ml&a%2520b=c%2526d"  # as the SDK sends it: urlencode({quote(k): quote(v)})
    first = call(app, "GET", "/v2/sandboxes", headers=key, params={"metadata": metadata, "limit": 2})
    assert [s["sandboxID"] for s in first.json()] == ["sb-2", "sb-1"]  # newest first; ended ones not shown
    assert [s["state"] for s in first.json()] == ["running", "paused"]
    assert first.json()[0]["endAt"] == "1970-01-01T00:33:20Z" and first.json()[0]["metadata"] == {
        "team": "ml"
    }
    token = first.headers["x-next-token"]
    second = call(app, "GET", "/v2/sandboxes", headers=key, params={"limit": 2, "nextToken": token})
    assert [s["sandboxID"] for s in second.json()] == ["sb-0"] and "x-next-token" not in second.headers
    paused = call(app, "GET", "/v2/sandboxes", headers=key, params={"state": "paused"})
    assert [s["sandboxID"] for s in paused.json()] == ["sb-1"]
    assert seen[0].url.params.get_list("label") == ["team=ml", "a b=c&d"]
    assert seen[0].headers["authorization"] == "Bearer tartarus_k"  # the caller's key, not the node's
    bad = call(app, "GET", "/v2/sandboxes", headers=key, params={"nextToken": "garbage!"})
    assert bad.status_code == 400 and bad.json()["code"] == 400


def test_process_calls_by_pid_reach_the_daemons_processes_endpoints(
    endpoint: tuple[E2BApp, StandIn, Mint],
) -> None:
    """SendInput, CloseStdin, SendSignal, List and Update become /v1 processes calls (the stand-in's
    sandbox is gone: each answers E2B's 502)."""
    app, daemon, mint = endpoint
    headers = sandbox("sb-1", mint.token("sb-1"))
    calls = [
        ("SendInput", {"process": {"pid": 7}, "input": {"stdin": "aGk="}}),
        ("CloseStdin", {"process": {"pid": 7}}),
        ("SendSignal", {"process": {"pid": 7}, "signal": "SIGNAL_SIGKILL"}),
        ("List", {}),
        ("Update", {"process": {"pid": 7}, "pty": {"size": {"rows": 40, "cols": 132}}}),
    ]
    for method, body in calls:
        response = call(app, "POST", f"/process.Process/{method}", headers=headers, json=body)
        assert response.status_code == 502, method
    assert daemon.calls == [
        "POST /v1/sandboxes/sb-1/processes/7/stdin",
        "POST /v1/sandboxes/sb-1/processes/7/stdin",
        "POST /v1/sandboxes/sb-1/processes/7/signal",
        "GET /v1/sandboxes/sb-1/processes",
        "POST /v1/sandboxes/sb-1/processes/7/resize",
    ]


def test_stream_input_sends_each_chunk_in_order_with_the_requests_own_credential(tmp_path: Path) -> None:
    """StreamInput, a client stream: its envelopes arrive split anywhere across HTTP/1.1 chunks; each
    `data` event goes to the daemon as stdin, in order, made with the sandbox's token the request
    presented (the endpoint has no key of its own); one empty message answers the finished stream."""
    seen: list[tuple[str, str, bytes]] = []

    def daemon(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers["authorization"], request.content))
        return httpx.Response(204)

    upstream = Upstream(url="http://daemon", transport=httpx.MockTransport(daemon))
    app = E2BApp(lambda: Layer(upstream))
    app.install(Layer(upstream))
    token = Mint().token("sb-1")
    messages: list[dict[str, Any]] = [
        {"start": {"process": {"pid": 7}}},
        {"data": {"input": {"stdin": "aGVsbG8g"}}},  # "hello "
        {"keepalive": {}},
        {"data": {"input": {"stdin": "c3RyZWFtCg=="}}},  # "stream\n"
    ]
    frames = b"".join(connect.envelope(m) for m in messages)

    async def chunked() -> AsyncIterator[bytes]:
        for at in range(0, len(frames), 7):  # envelopes split across chunks
            yield frames[at : at + 7]

    headers = sandbox("sb-1", token) | {"Content-Type": "application/connect+json"}
    response = call(app, "POST", "/process.Process/StreamInput", headers=headers, content=chunked())
    assert response.status_code == 200
    assert connect.decode_envelopes(response.content) == [{}, {}]  # the answer, then a clean end
    assert response.content[len(connect.envelope({}))] == connect.END_STREAM
    assert [(p, a) for p, a, _ in seen] == [("/v1/sandboxes/sb-1/processes/7/stdin", f"Bearer {token}")] * 2
    assert [json.loads(body)["data"] for _, _, body in seen] == ["aGVsbG8g", "c3RyZWFtCg=="]
    no_start = connect.envelope({"data": {"input": {"stdin": "eA=="}}})
    refused = call(app, "POST", "/process.Process/StreamInput", headers=headers, content=no_start)
    (end,) = connect.decode_envelopes(refused.content)
    assert end["error"]["code"] == "invalid_argument" and len(seen) == 2


def test_create_hands_out_the_daemons_scoped_tokens_and_maps_auto_pause(tmp_path: Path) -> None:
    """The create answer's tokens are the daemon's (minted with the caller's key); `autoPause` becomes
    hibernation after the timeout's seconds without a call instead of a timeout that kills."""
    seen: list[tuple[str, str, Any]] = []
    view = {"id": "sb-1", "template": "base", "state": "running", "created_at": 1.0, "vcpus": 1}

    def daemon(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        seen.append((request.url.path, request.headers["authorization"], body))
        if request.url.path.endswith("/tokens"):
            return httpx.Response(
                200, json={"sandbox_id": "sb-1", "data": "tsbx.data.x", "code": "tsbx.code.x"}
            )
        return httpx.Response(201, json=view | {"memory_mib": 512})

    upstream = Upstream(url="http://daemon", transport=httpx.MockTransport(daemon))
    app = E2BApp(lambda: Layer(upstream))
    app.install(Layer(upstream))
    key = {"X-API-KEY": "tartarus_k"}
    paused = call(
        app,
        "POST",
        "/v2/sandboxes",
        headers=key,
        json={"templateID": "base", "timeout": 30, "autoPause": True},
    )
    assert paused.status_code == 201
    assert (
        paused.json()["envdAccessToken"] == "tsbx.data.x"
        and paused.json()["trafficAccessToken"] == "tsbx.code.x"
    )
    (path, auth, spec), (tokens, tokens_auth, _) = seen
    assert path == "/v1/sandboxes" and auth == "Bearer tartarus_k" and spec["idle_timeout_s"] == 30
    assert "timeout" not in spec
    assert tokens == "/v1/sandboxes/sb-1/tokens" and tokens_auth == "Bearer tartarus_k"
    seen.clear()
    killed = call(app, "POST", "/v2/sandboxes", headers=key, json={"templateID": "base", "timeout": 30})
    assert killed.status_code == 201 and seen[0][2]["timeout"] == 30 and "idle_timeout_s" not in seen[0][2]
