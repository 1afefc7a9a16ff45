"""The API's defences against callers on the host (issue 14): operator-only verdicts, no body read
before the key, bounded bodies and listings, a private socket, no audit lines for anonymous calls, and
errors and listings that do not show host paths to tenants. Each runs against a real daemon."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tartarus.sdk import Sandbox
from tests.api.conftest import tcp_daemon

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
