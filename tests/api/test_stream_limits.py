"""Open streaming calls are limited per tenant through the API itself (exec, file reads), and a slot comes
back when its stream ends: one tenant cannot hold the daemon's memory with streams nobody reads."""

from __future__ import annotations

import base64
import contextlib
import json

import httpx
import pytest

from tartarus.daemon import control
from tartarus.sdk import Sandbox
from tests.api.conftest import Api
from tests.conftest import wait_until


@pytest.fixture
def two_streams(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(control, "MAX_TENANT_STREAMS", 2)  # the daemon runs in this process
    return 2


def test_a_tenants_open_streams_are_limited_and_freed(api: Api, two_streams: int) -> None:
    key = api.new_key("streamer")
    other = api.new_key("bystander")
    with Sandbox.create("python-ds", url=api.url, api_key=key) as sb, api.client(key) as c:
        sb.files.write("/tmp/big", b"x" * (8 << 20))
        exec_path = f"/v1/sandboxes/{sb.id}/exec"
        with contextlib.ExitStack() as held:
            lines = []  # a dropped line iterator would close its connection (and free the slot)
            for _ in range(two_streams):
                response = held.enter_context(c.stream("POST", exec_path, json={"argv": ["sleep", "60"]}))
                assert response.status_code == 200
                lines.append(response.iter_lines())
                assert '"started"' in next(lines[-1])  # the stream is open
            refused = c.post(exec_path, json={"argv": ["true"]})
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "quota_exceeded"
            read = c.get(f"/v1/sandboxes/{sb.id}/files", params={"path": "/tmp/big"})
            assert read.status_code == 429
            # Another tenant's streams are its own.
            with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {other}"}) as o:
                assert o.get("/v1/sandboxes").status_code == 200
        # The held streams ended (the client left): their slots are free again once the daemon has seen
        # the connections close and ended their commands, which happens after the client moved on.
        answers: list[httpx.Response] = []

        def slot_free() -> bool:
            answers.append(c.post(exec_path, json={"argv": ["echo", "again"]}))
            return answers[-1].status_code != 429

        assert wait_until(slot_free, 30), answers[-1].text
        assert answers[-1].status_code == 200, answers[-1].text
        assert len(c.get(f"/v1/sandboxes/{sb.id}/files", params={"path": "/tmp/big"}).content) == 8 << 20


def test_a_stream_holds_its_sandbox_until_the_client_leaves(api: Api) -> None:
    """An open exec stream keeps its sandbox from idle hibernation; a client that leaves mid-stream
    gives the hold back (the command is killed), so the sandbox then idles into hibernation."""
    key = api.new_key("holder")
    with Sandbox.create("python-ds", url=api.url, api_key=key, idle_timeout=1) as sb, api.client(key) as c:
        argv = ["sh", "-c", "sleep 3; echo tick; exec sleep 60"]
        with c.stream("POST", f"/v1/sandboxes/{sb.id}/exec", json={"argv": argv}) as response:
            assert response.status_code == 200
            events = (json.loads(line) for line in response.iter_lines() if line.strip())
            assert next(events)["type"] == "started"
            # Several idle checks (one a second) pass while the stream is open and quiet.
            assert base64.b64decode(next(events)["data"]) == b"tick\n"
            assert c.get(f"/v1/sandboxes/{sb.id}").json()["state"] == "running"
        assert wait_until(lambda: c.get(f"/v1/sandboxes/{sb.id}").json()["state"] == "hibernated", 60)
