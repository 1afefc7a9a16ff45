"""E2B's code interpreter port (tartarus.e2b.interpreter) with a stand-in daemon: the NDJSON that
e2b-code-interpreter's `parse_output` folds into its Execution, the contexts, and the refusals. The real
SDK against real sandboxes is tests/e2b_compat/test_sdk.py."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest

from tartarus.daemon.scoped import SandboxTokens
from tartarus.e2b.app import E2BApp
from tartarus.e2b.interpreter import execution_lines
from tartarus.e2b.layer import Layer
from tartarus.e2b.upstream import Upstream
from tartarus.wire import Execution, ExecutionError, Result
from tests.unit.test_e2b_routing import call

RUN = {
    "stdout": "hi\n",
    "stderr": "",
    "result": "2",
    "results": [
        {"png": "iVBORw0KGgo=", "text": "<Figure size 640x480 with 1 Axes>", "is_main_result": False},
        {"text": "2", "html": "<b>2</b>", "json": {"v": 2}, "is_main_result": True},
    ],
    "execution_count": 3,
    "error": None,
}
CONTEXT = {"id": "c0ffee", "language": "python", "cwd": "/tmp"}


class Mint:
    """Tokens as the daemon mints them (daemon/scoped.py) for its tenant alice's sandboxes: the stand-in
    daemon checks none (the endpoint only matches them to the routed sandbox; the daemon verifies)."""

    def __init__(self) -> None:
        self._tokens = SandboxTokens(secrets.token_bytes(32))

    def token(self, sandbox_id: str) -> str:
        return self._tokens.mint("data", sandbox_id, "alice")

    def traffic_token(self, sandbox_id: str) -> str:
        return self._tokens.mint("code", sandbox_id, "alice")


def test_an_execution_is_the_lines_the_sdk_parses() -> None:
    execution = Execution(
        stdout="a\nb\n",
        stderr="warn\n",
        result=None,
        error=ExecutionError("ZeroDivisionError", "division by zero", "Traceback ...\n"),
        results=(Result(png="iVBO", text="<Figure>"), Result(text="2", is_main_result=True)),
        execution_count=7,
    )
    lines = [json.loads(line) for line in execution_lines(execution, 1234).splitlines()]
    assert lines == [
        {"type": "stdout", "text": "a\nb\n", "timestamp": 1234},
        {"type": "stderr", "text": "warn\n", "timestamp": 1234},
        {"type": "result", "text": "<Figure>", "png": "iVBO", "is_main_result": False},
        {"type": "result", "text": "2", "is_main_result": True},
        {
            "type": "error",
            "name": "ZeroDivisionError",
            "value": "division by zero",
            "traceback": "Traceback ...\n",
        },
        {"type": "number_of_executions", "execution_count": 7},
        {"type": "end_of_execution"},
    ]
    quiet = Execution(stdout="", stderr="", result=None, error=None)
    assert execution_lines(quiet, 1) == b'{"type":"end_of_execution"}\n'  # no empty logs


class Daemon:
    """A daemon with one sandbox, sb-1, whose interpreter answers as recorded in `answers`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.calls.append((request.method, request.url.path, body))
        path = request.url.path
        if not path.startswith("/v1/sandboxes/sb-1"):
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "no such sandbox"}})
        if path.endswith("/code"):
            return httpx.Response(200, json=RUN)
        if path.endswith("/contexts/missing/restart"):
            return httpx.Response(
                404, json={"error": {"code": "not_found", "message": "no context 'missing'"}}
            )
        if path.endswith("/code/contexts") and request.method == "GET":
            return httpx.Response(200, json={"contexts": [CONTEXT]})
        if path.endswith("/code/contexts") or path.endswith("/restart"):
            return httpx.Response(201, json=CONTEXT)
        if request.method == "DELETE":
            return httpx.Response(204)
        body = {"id": "sb-1", "template": "python-ds", "state": "running", "created_at": 1.0, "vcpus": 1}
        return httpx.Response(200, json=body | {"memory_mib": 512})


@pytest.fixture
def endpoint(tmp_path: Path) -> tuple[E2BApp, Daemon, Mint]:
    (tmp_path / "admin.key").write_text("tartarus_node\n")
    daemon = Daemon()
    upstream = Upstream(url="http://daemon", transport=httpx.MockTransport(daemon))
    mint = Mint()
    app = E2BApp(lambda: Layer(upstream))
    app.install(Layer(upstream))
    return app, daemon, mint


def routed(
    sid: str, *, access: str | None = None, traffic: str | None = None, port: int = 49999
) -> dict[str, str]:
    headers = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": str(port)}
    if access is not None:
        headers["X-Access-Token"] = access
    if traffic is not None:
        headers["E2B-Traffic-Access-Token"] = traffic
    return headers


def test_execute_forwards_the_cell_and_answers_ndjson(endpoint: tuple[E2BApp, Daemon, Mint]) -> None:
    app, daemon, mint = endpoint
    body = {"code": "1+1", "context_id": "c0ffee", "language": "python", "env_vars": {"A": "b"}}
    response = call(app, "POST", "/execute", headers=routed("sb-1", access=mint.token("sb-1")), json=body)
    assert response.status_code == 200
    assert daemon.calls == [
        ("POST", "/v1/sandboxes/sb-1/code", {"code": "1+1", "context": "c0ffee", "env": {"A": "b"}})
    ]
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["type"] for line in lines] == [
        "stdout",
        "result",
        "result",
        "number_of_executions",
        "end_of_execution",
    ]
    assert lines[2] == {
        "type": "result",
        "text": "2",
        "html": "<b>2</b>",
        "json": {"v": 2},
        "is_main_result": True,
    }
    # the SDK sends null for what it was not given
    bare = {"code": "x", "context_id": None, "language": None, "env_vars": None}
    assert (
        call(
            app, "POST", "/execute", headers=routed("sb-1", access=mint.token("sb-1")), json=bare
        ).status_code
        == 200
    )
    assert daemon.calls[-1] == ("POST", "/v1/sandboxes/sb-1/code", {"code": "x"})


def test_contexts_open_to_the_traffic_token_the_sdk_sends(endpoint: tuple[E2BApp, Daemon, Mint]) -> None:
    app, daemon, mint = endpoint
    headers = routed("sb-1", traffic=mint.traffic_token("sb-1"))
    made = call(app, "POST", "/contexts", headers=headers, json={"cwd": "/tmp", "language": "python"})
    assert made.status_code == 200 and made.json() == CONTEXT
    assert call(app, "GET", "/contexts", headers=headers).json() == [CONTEXT]
    assert call(app, "POST", "/contexts/c0ffee/restart", headers=headers).status_code == 204
    assert call(app, "DELETE", "/contexts/c0ffee", headers=headers).status_code == 204
    assert [c[:2] for c in daemon.calls] == [
        ("POST", "/v1/sandboxes/sb-1/code/contexts"),
        ("GET", "/v1/sandboxes/sb-1/code/contexts"),
        ("POST", "/v1/sandboxes/sb-1/code/contexts/c0ffee/restart"),
        ("DELETE", "/v1/sandboxes/sb-1/code/contexts/c0ffee"),
    ]
    assert daemon.calls[0][2] == {"cwd": "/tmp"}


def test_tokens_open_only_what_they_are_for(endpoint: tuple[E2BApp, Daemon, Mint]) -> None:
    app, daemon, mint = endpoint
    refused = [
        routed("sb-1"),
        routed("sb-1", traffic=mint.traffic_token("sb-2")),
        routed("sb-1", access=mint.token("sb-2")),
        routed("sb-1", traffic=mint.token("sb-1")),  # the access token is not a traffic token
    ]
    for headers in refused:
        response = call(app, "POST", "/execute", headers=headers, json={"code": "1"})
        assert response.status_code == 401 and response.json()["code"] == 401
    # the traffic token opens no envd
    envd = call(app, "GET", "/health", headers=routed("sb-1", traffic=mint.traffic_token("sb-1"), port=49983))
    assert envd.status_code == 401
    assert daemon.calls == []


def test_bad_requests_are_refused_before_the_daemon(endpoint: tuple[E2BApp, Daemon, Mint]) -> None:
    app, daemon, mint = endpoint
    headers = routed("sb-1", access=mint.token("sb-1"))
    cases: list[tuple[dict[str, Any], int]] = [
        ({"content": b"{not json"}, 400),
        ({"json": ["code"]}, 400),
        ({"json": {"code": 5}}, 400),
        ({"json": {"code": "1", "language": "r"}}, 400),
        ({"json": {"code": "1", "env_vars": {"A": 1}}}, 400),
        ({"json": {"code": "1", "context_id": "../x"}}, 404),
        ({"content": b'{"code": "' + b"x" * (3 << 20) + b'"}'}, 413),
    ]
    for kwargs, status in cases:
        response = call(app, "POST", "/execute", headers=headers, **kwargs)
        assert response.status_code == status, kwargs
        assert response.json()["code"] == status and response.json()["message"]
    bash = call(app, "POST", "/contexts", headers=headers, json={"language": "bash"})
    assert bash.status_code == 400 and "Python" in bash.json()["message"]
    assert daemon.calls == []


def test_a_missing_context_is_404_and_a_gone_sandbox_502(endpoint: tuple[E2BApp, Daemon, Mint]) -> None:
    app, _, mint = endpoint
    missing = call(
        app, "POST", "/contexts/missing/restart", headers=routed("sb-1", traffic=mint.traffic_token("sb-1"))
    )
    assert missing.status_code == 404 and "missing" in missing.json()["message"]
    gone = call(
        app, "POST", "/execute", headers=routed("sb-9", access=mint.token("sb-9")), json={"code": "1"}
    )
    assert gone.status_code == 502 and "was not found" in gone.json()["message"]
