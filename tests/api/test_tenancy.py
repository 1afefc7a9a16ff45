"""Tenancy, quotas, labels and timeouts on real sandboxes (restored VMs), against each store backend."""

from __future__ import annotations

import json
import time

import pytest

from tartarus.errors import NotFound, QuotaExceeded
from tartarus.sdk import Sandbox
from tests.api.conftest import Api
from tests.conftest import qemu_pids, wait_until

pytestmark = pytest.mark.vm


def test_a_tenant_sees_and_touches_only_its_own_sandboxes(api: Api) -> None:
    alice, bob = api.new_key("alice"), api.new_key("bob")
    with Sandbox.create("python-ds", url=api.url, api_key=alice, labels={"team": "ml"}) as sb:
        assert sb.info.tenant == "alice" and sb.info.labels == {"team": "ml"}
        with api.client(bob) as c:
            for method, path, kwargs in (
                ("GET", f"/v1/sandboxes/{sb.id}", {}),
                ("DELETE", f"/v1/sandboxes/{sb.id}", {}),
                ("POST", f"/v1/sandboxes/{sb.id}/exec", {"json": {"argv": ["true"]}}),
                ("POST", f"/v1/sandboxes/{sb.id}/code", {"json": {"code": "1"}}),
                ("GET", f"/v1/sandboxes/{sb.id}/files", {"params": {"path": "/etc/hostname"}}),
                ("PUT", f"/v1/sandboxes/{sb.id}/timeout", {"json": {"timeout": 1}}),
            ):
                response = c.request(method, path, **kwargs)
                # Exactly what an id that never existed gets: ids do not leak across tenants.
                assert response.status_code == 404, (method, path, response.text)
                assert response.json()["error"] == {"code": "not_found", "message": f"no sandbox {sb.id!r}"}
            assert c.get("/v1/sandboxes").json()["sandboxes"] == []
        with pytest.raises(NotFound):
            Sandbox.connect(sb.id, url=api.url, api_key=bob)
        # The owner and an admin see it; label filters select it.
        assert [s.id for s in Sandbox.list(url=api.url, api_key=alice)] == [sb.id]
        assert [s.id for s in Sandbox.list(url=api.url, api_key=alice, labels={"team": "ml"})] == [sb.id]
        assert Sandbox.list(url=api.url, api_key=alice, labels={"team": "web"}) == []
        admin_view = Sandbox.list(url=api.url, api_key=api.admin_key, labels={"team": "ml"})
        assert sb.id in [s.id for s in admin_view]
        assert sb.commands.run("echo still-mine").stdout == "still-mine\n"


def test_quota_refuses_creates_beyond_the_limit_with_a_clear_error(api: Api) -> None:
    key = api.new_key("quota-t")
    with api.client(api.admin_key) as admin:
        admin.put("/v1/tenants/quota-t/quota", json={"max_sandboxes": 1, "max_vcpus": 8}).raise_for_status()
    with Sandbox.create("python-ds", url=api.url, api_key=key) as first:
        with pytest.raises(QuotaExceeded, match="max_sandboxes=1"):
            Sandbox.create("python-ds", url=api.url, api_key=key)
        with api.client(key) as c:
            usage = c.get("/v1/tenants/quota-t").json()["usage"]
            assert usage == {
                "sandboxes": 1,
                "vcpus": first.info.vcpus,
                "memory_mib": first.info.memory_mib,
                "checkpoints": 0,
            }
    # Freed by the delete: the next create is admitted; a request above the vCPU limit is not.
    with Sandbox.create("python-ds", url=api.url, api_key=key):
        pass
    with pytest.raises(QuotaExceeded, match="max_vcpus=8"):
        Sandbox.create("python-ds", url=api.url, api_key=key, vcpus=9)


def test_timeout_destroys_the_sandbox_and_records_why(api: Api) -> None:
    key = api.new_key("ttl")
    sb = Sandbox.create("python-ds", url=api.url, api_key=key, timeout=3600)
    assert sb.info.expires_at is not None and sb.info.expires_at > time.time() + 3500
    info = sb.set_timeout(0.5)
    assert info.timeout == 0.5 and info.expires_at is not None and info.expires_at < time.time() + 1
    workdir = api.state / "sandboxes" / sb.id
    assert wait_until(lambda: not workdir.exists(), timeout=30)
    assert not qemu_pids(workdir)
    with pytest.raises(NotFound):
        sb.refresh()
    (ended,) = [s for s in Sandbox.list(url=api.url, api_key=key, include_ended=True) if s.id == sb.id]
    assert ended.state == "destroyed" and "timeout" in (ended.error or "")


def test_create_and_exec_latency_reach_the_metrics(api: Api) -> None:
    key = api.new_key("metered")
    with Sandbox.create("python-ds", url=api.url, api_key=key) as sb:
        sb.commands.run("true")
        with api.client(api.admin_key) as c:
            text = c.get("/metrics").text
    assert 'tartarus_sandboxes{state="running"}' in text
    assert "tartarus_sandbox_create_seconds_count" in text and "tartarus_exec_seconds_count" in text
    assert "tartarus_pool_vmms" in text


def test_exec_streams_server_sent_events_on_request(api: Api) -> None:
    key = api.new_key("sse")
    with Sandbox.create("python-ds", url=api.url, api_key=key) as sb, api.client(key) as c:
        body = {"argv": ["/bin/sh", "-c", "echo one; echo two >&2; exit 3"]}
        headers = {"Accept": "text/event-stream"}
        with c.stream("POST", f"/v1/sandboxes/{sb.id}/exec", json=body, headers=headers) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            text = response.read().decode()
    events = [block.splitlines() for block in text.strip().split("\n\n")]
    names = [lines[0].removeprefix("event: ") for lines in events]
    assert names[0] == "started" and names[-1] == "exit" and {"stdout", "stderr"} <= set(names)
    last = json.loads(events[-1][1].removeprefix("data: "))
    assert last == {"type": "exit", "exit_code": 3, "timed_out": False}
