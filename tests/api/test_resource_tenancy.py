"""Tenancy of what outlives a running sandbox: checkpoints and the records of ended sandboxes.

Two tenants' keys on the session daemon: each must see and use only its own checkpoints and ended
records, exactly as if the other tenant's did not exist (404, as for an id that never existed).
"""

from __future__ import annotations

from typing import Any

import pytest

from tartarus.errors import NotFound
from tartarus.sdk import Client, Sandbox

pytestmark = pytest.mark.vm


def new_key(daemon_url: str, tenant: str) -> str:
    with Client(daemon_url) as admin:  # the local admin key
        return str(admin.request("POST", "/v1/keys", json={"tenant": tenant}).json()["key"])


def checkpoint_ids(client: Client) -> list[str]:
    return [c["id"] for c in client.request("GET", "/v1/checkpoints").json()["checkpoints"]]


def test_a_tenant_uses_only_its_own_checkpoints(daemon_url: str) -> None:
    alice, bob = new_key(daemon_url, "cp-alice"), new_key(daemon_url, "cp-bob")
    with Sandbox.create("python-ds", url=daemon_url, api_key=alice) as sb:
        sb.run_code("mark = 'alice'")
        checkpoint = sb.snapshot().id
    with Client(daemon_url, bob) as c:
        assert checkpoint not in checkpoint_ids(c)
        requests: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", f"/v1/checkpoints/{checkpoint}", {}),
            ("POST", f"/v1/checkpoints/{checkpoint}/sandboxes", {"json": {}}),
            ("DELETE", f"/v1/checkpoints/{checkpoint}", {}),
        ]
        for method, path, kwargs in requests:
            with pytest.raises(NotFound, match=f"no checkpoint {checkpoint!r}"):
                c.request(method, path, **kwargs)
    # Its owner still has it, whole: listed, readable, restorable, then deletable.
    with Client(daemon_url, alice) as c:
        assert checkpoint in checkpoint_ids(c)
        assert c.request("GET", f"/v1/checkpoints/{checkpoint}").json()["id"] == checkpoint
    with Sandbox.create(from_snapshot=checkpoint, url=daemon_url, api_key=alice) as copy:
        assert copy.info.tenant == "cp-alice"
        assert copy.run_code("mark").result == "'alice'"
    with Client(daemon_url, alice) as c:
        c.request("DELETE", f"/v1/checkpoints/{checkpoint}")
        assert checkpoint not in checkpoint_ids(c)


def test_ended_sandboxes_are_listed_only_to_their_tenant(daemon_url: str) -> None:
    alice, bob = new_key(daemon_url, "ended-alice"), new_key(daemon_url, "ended-bob")
    with Sandbox.create("python-ds", url=daemon_url, api_key=bob, labels={"who": "bob"}) as sb:
        ended = sb.id
    theirs = {s.id: s for s in Sandbox.list(url=daemon_url, api_key=bob, include_ended=True)}
    assert theirs[ended].state == "destroyed" and theirs[ended].tenant == "ended-bob"
    for labels in (None, {"who": "bob"}):
        mine = Sandbox.list(url=daemon_url, api_key=alice, include_ended=True, labels=labels)
        assert [s.id for s in mine if s.tenant != "ended-alice"] == []
    admin_view = Sandbox.list(url=daemon_url, include_ended=True)
    assert ended in [s.id for s in admin_view]
