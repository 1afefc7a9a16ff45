"""Quotas and policy caps hold on every path, not only on create: wakes (explicit and implicit), timeouts
set later, checkpoints (a tenant quota, a default TTL, the host's hibernation disk quota). Real daemons,
tenant keys and restored VMs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tartarus.daemon import config as config_module
from tartarus.daemon import schedulers as schedulers_module
from tartarus.daemon.app import create_app
from tartarus.daemon.config import DaemonConfig
from tartarus.errors import QuotaExceeded
from tartarus.sdk import Sandbox
from tests.api.conftest import Api, env, tcp_daemon
from tests.conftest import wait_until

pytestmark = pytest.mark.vm

WEEK_S = 7 * 24 * 3600


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One daemon (SQLite: the store backends are covered by tests/store) with the default policy, whose
    checkpoint expiry sweep runs often so that an expired checkpoint's removal is seen soon."""
    state = tmp_path_factory.mktemp("quota-bypass")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(schedulers_module, "CHECKPOINT_SWEEP_S", 0.2)
        with tcp_daemon(state, None) as url:
            yield Api(url, state, (state / "admin.key").read_text().strip(), "sqlite")


def _set_quota(api: Api, tenant: str, **quota: int) -> None:
    with api.client(api.admin_key) as admin:
        admin.put(f"/v1/tenants/{tenant}/quota", json=quota).raise_for_status()


def _state(c: httpx.Client, sandbox_id: str) -> str:
    return str(c.get(f"/v1/sandboxes/{sandbox_id}").json()["state"])


def _refused_for_quota(response: httpx.Response, limit: str) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "quota_exceeded" and limit in error["message"], error


def _fetch(address: str) -> bytes:
    """GET /hello.txt from a guest's server through its exposed address (it may still be starting)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return httpx.get(f"http://{address}/hello.txt", timeout=10).raise_for_status().content
        except httpx.HTTPError:
            assert time.monotonic() < deadline, f"nothing answered on {address}"
            time.sleep(0.2)  # the guest's server is starting: poll it


def test_a_wake_is_admitted_against_the_quota_like_a_create(api: Api) -> None:
    key = api.new_key("wake-t")
    with Sandbox.create("python-ds", url=api.url, api_key=key) as a, api.client(key) as c:
        vcpus = a.info.vcpus
        _set_quota(api, "wake-t", max_vcpus=vcpus)  # room for one running sandbox
        a.files.write("/root/hello.txt", b"hello")
        a.commands.run("setsid python3 -m http.server 8000 --directory /root >/dev/null 2>&1 </dev/null &")
        address = a.get_host(8000)
        assert _fetch(address) == b"hello"
        a.hibernate()
        assert a.info.state == "hibernated"
        with Sandbox.create("python-ds", url=api.url, api_key=key) as b:  # A holds no vCPUs asleep
            # Every way to wake A is refused, and A stays hibernated: an explicit wake (by its owner,
            # or by an admin: it is the owner's quota), a call on it, a code run, a file read.
            _refused_for_quota(c.post(f"/v1/sandboxes/{a.id}/wake"), f"max_vcpus={vcpus}")
            with api.client(api.admin_key) as admin:
                _refused_for_quota(admin.post(f"/v1/sandboxes/{a.id}/wake"), f"max_vcpus={vcpus}")
            exec_body = {"argv": ["true"]}
            _refused_for_quota(c.post(f"/v1/sandboxes/{a.id}/exec", json=exec_body), "max_vcpus")
            _refused_for_quota(c.post(f"/v1/sandboxes/{a.id}/code", json={"code": "1"}), "max_vcpus")
            files = c.get(f"/v1/sandboxes/{a.id}/files", params={"path": "/etc/hostname"})
            _refused_for_quota(files, "max_vcpus")
            with pytest.raises(QuotaExceeded):
                Sandbox.connect(a.id, url=api.url, api_key=key).commands.run("true")
            # And a connection to its exposed port: closed unanswered, not a way to wake it.
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://{address}/hello.txt", timeout=120)
            assert _state(c, a.id) == "hibernated"
            usage = c.get("/v1/tenants/wake-t").json()["usage"]
            assert (usage["sandboxes"], usage["vcpus"]) == (2, b.info.vcpus)
        # B's vCPUs are free again: the same wake is admitted, and A runs as it was.
        assert c.post(f"/v1/sandboxes/{a.id}/wake").json()["state"] == "running"
        assert a.commands.run("echo awake").stdout == "awake\n"
        assert _fetch(address) == b"hello"  # its server runs on, as it was
        assert c.get("/v1/tenants/wake-t").json()["usage"]["vcpus"] == vcpus


def test_a_new_timeout_is_capped_by_the_policy_like_a_create(api: Api) -> None:
    key = api.new_key("ttl-cap")
    with api.client(key) as c:
        created = c.post("/v1/sandboxes", json={"template": "python-ds", "timeout": 172_800})
        assert created.status_code == 400 and "policy limit of 86400" in created.json()["error"]["message"]
    with Sandbox.create("python-ds", url=api.url, api_key=key, timeout=600) as sb, api.client(key) as c:
        path = f"/v1/sandboxes/{sb.id}/timeout"
        for timeout in (2_592_000, 172_800, None):
            response = c.put(path, json={"timeout": timeout})
            assert response.status_code == 400, (timeout, response.text)
            error = response.json()["error"]
            assert error["code"] == "invalid_argument" and "86400" in error["message"], error
        info = c.get(f"/v1/sandboxes/{sb.id}").json()
        assert info["timeout"] == 600  # the refused requests changed nothing
        assert c.put(path, json={"timeout": 86_400}).json()["timeout"] == 86_400


def test_checkpoints_count_against_the_tenant_quota(api: Api) -> None:
    key = api.new_key("ck-quota")
    _set_quota(api, "ck-quota", max_checkpoints=1)
    with Sandbox.create("python-ds", url=api.url, api_key=key) as sb, api.client(key) as c:
        first = c.post(f"/v1/sandboxes/{sb.id}/checkpoints", json={})
        assert first.status_code == 201, first.text
        _refused_for_quota(c.post(f"/v1/sandboxes/{sb.id}/checkpoints", json={}), "max_checkpoints=1")
        tenant = c.get("/v1/tenants/ck-quota").json()
        assert tenant["quota"]["max_checkpoints"] == 1 and tenant["usage"]["checkpoints"] == 1
        # Deleting one frees its place.
        assert c.delete(f"/v1/checkpoints/{first.json()['id']}").status_code == 204
        second = c.post(f"/v1/sandboxes/{sb.id}/checkpoints", json={})
        assert second.status_code == 201, second.text
        c.delete(f"/v1/checkpoints/{second.json()['id']}")


def test_a_checkpoint_gets_the_policy_ttl_and_is_deleted_when_it_expires(api: Api) -> None:
    key = api.new_key("ck-ttl")
    with Sandbox.create("python-ds", url=api.url, api_key=key) as sb, api.client(key) as c:
        kept = c.post(f"/v1/sandboxes/{sb.id}/checkpoints", json={}).json()
        assert kept["ttl_s"] == WEEK_S  # the default policy's default_checkpoint_ttl_s
        too_long = c.post(f"/v1/sandboxes/{sb.id}/checkpoints", json={"ttl_s": 31 * 24 * 3600})
        assert too_long.status_code == 400 and "policy limit" in too_long.json()["error"]["message"]
        short = c.post(f"/v1/sandboxes/{sb.id}/checkpoints", json={"ttl_s": 1}).json()
        # Deleted at expiry by the daemon itself: nobody calls gc.
        assert wait_until(lambda: c.get(f"/v1/checkpoints/{short['id']}").status_code == 404, timeout=60)
        assert not (api.state / "checkpoints" / short["id"]).exists()
        assert c.get(f"/v1/checkpoints/{kept['id']}").status_code == 200
        c.delete(f"/v1/checkpoints/{kept['id']}")


def test_the_hibernation_disk_quota_is_on_by_default(tmp_path: Path) -> None:
    """No TARTARUS_HIBERNATE_QUOTA_MIB: the built-in default limits captures (made tiny here, so that a
    capture is refused before it writes anything)."""
    with pytest.MonkeyPatch.context() as m, env(TARTARUS_HIBERNATE_QUOTA_MIB=None):
        m.setattr(config_module, "DEFAULT_HIBERNATE_QUOTA_MIB", 1)
        app = create_app(tmp_path, DaemonConfig(pool_size=0))
    with tcp_daemon(tmp_path, None, app) as url:
        key = (tmp_path / "admin.key").read_text().strip()
        with Sandbox.create("python-ds", url=url, api_key=key) as sb, httpx.Client(base_url=url) as c:
            headers = {"Authorization": f"Bearer {key}"}
            response = c.post(f"/v1/sandboxes/{sb.id}/checkpoints", json={}, headers=headers, timeout=120)
            _refused_for_quota(response, "hibernation storage quota: 0 MiB of 1 MiB used")
            assert c.post(f"/v1/sandboxes/{sb.id}/hibernate", headers=headers, timeout=120).status_code == 429
            assert sb.commands.run("echo still-running").stdout == "still-running\n"
