"""The audit trail's group commit loses nothing answered: a daemon killed with -9 right after its 2xx
answers has every one of those calls' lines in `audit.log` (written before the answer, fsynced after),
and the next daemon serves on with the same trail, each call's row readable by the next call."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import qemu_pids
from tests.served import Served

pytestmark = pytest.mark.vm


@pytest.fixture
def daemons() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for d in started:
        d.stop(signal.SIGKILL)


def test_kill_9_after_the_answers_loses_no_audit_line(tmp_path: Path, daemons: list[Served]) -> None:
    state = tmp_path / "state"
    first = Served(state)
    daemons.append(first)
    created: dict[str, str] = {}
    with httpx.Client(base_url=first.url, headers={"Authorization": f"Bearer {first.key}"}) as c:
        for i in range(3):
            answer = c.post(
                "/v1/sandboxes", json={"template": "python-ds"}, headers={"X-Request-ID": f"durable-{i}"}
            )
            assert answer.status_code == 201, answer.text
            created[f"durable-{i}"] = answer.json()["id"]
    first.stop(signal.SIGKILL)  # at once: the group commit had no time of its own after the last answer

    lines = [json.loads(line) for line in (state / "audit.log").read_text().splitlines()]
    audited = {e["request_id"]: e for e in lines if str(e.get("request_id", "")).startswith("durable-")}
    assert set(audited) == set(created)
    for rid, sandbox_id in created.items():
        assert audited[rid]["action"] == "POST /v1/sandboxes" and audited[rid]["status"] == 201
        assert audited[rid]["target"] == sandbox_id

    # The next daemon takes the sandboxes over and appends to the same trail.
    second = Served(state)
    daemons.append(second)
    with httpx.Client(base_url=second.url, headers={"Authorization": f"Bearer {second.key}"}) as c:
        for sandbox_id in created.values():
            assert c.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204
            # Its row (queued on the store's thread after the answer) is there for the next call.
            (entry,) = c.get("/v1/audit", params={"limit": 1}).json()["entries"]
            assert (entry["action"], entry["target"]) == ("DELETE /v1/sandboxes/{sandbox_id}", sandbox_id)
    second.stop(signal.SIGTERM)
    assert not qemu_pids(state / "sandboxes")
    after = [json.loads(line) for line in (state / "audit.log").read_text().splitlines()]
    deleted = [e for e in after if e["action"] == "DELETE /v1/sandboxes/{sandbox_id}"]
    assert {e["target"] for e in deleted} == set(created.values())
