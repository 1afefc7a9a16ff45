"""Every way of making a sandbox is admitted against the tenant's quota, not only create: a fork of N
copies and a start from a checkpoint are counted before the runtime is asked for anything."""

from __future__ import annotations

import pytest

from tartarus.sdk import QuotaExceeded, Sandbox
from tests.api.conftest import Api


def _quota(api: Api, tenant: str, **limits: int) -> str:
    key = api.new_key(tenant)
    with api.client(api.admin_key) as admin:
        admin.put(f"/v1/tenants/{tenant}/quota", json=limits).raise_for_status()
    return key


def _live(api: Api, key: str) -> list[str]:
    return [s.id for s in Sandbox.list(url=api.url, api_key=key)]


def test_a_fork_beyond_the_sandbox_quota_is_refused_and_makes_nothing(api: Api) -> None:
    key = _quota(api, "fork-q", max_sandboxes=2)
    with Sandbox.create("python-ds", url=api.url, api_key=key) as sb:
        with pytest.raises(QuotaExceeded, match="max_sandboxes=2"):
            sb.fork(2)
        assert _live(api, key) == [sb.id]
        (copy,) = sb.fork(1)
        with copy:
            assert sorted(_live(api, key)) == sorted([sb.id, copy.id])


def test_a_start_from_a_checkpoint_beyond_the_quota_is_refused(api: Api) -> None:
    key = _quota(api, "ckpt-q", max_sandboxes=1)
    with Sandbox.create("python-ds", url=api.url, api_key=key) as sb:
        checkpoint = sb.snapshot()
        with api.client(key) as c:
            response = c.post(f"/v1/checkpoints/{checkpoint.id}/sandboxes", json={})
            assert response.status_code == 429, response.text
            assert response.json()["error"]["code"] == "quota_exceeded"
            assert _live(api, key) == [sb.id]
            c.delete(f"/v1/checkpoints/{checkpoint.id}").raise_for_status()
