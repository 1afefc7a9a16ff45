"""Pure logic of the control plane: quota arithmetic and reservations, JSON log lines, request IDs, audit."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from tartarus import audit
from tartarus.daemon import quotas
from tartarus.daemon.auth import Principal
from tartarus.daemon.control import MAX_TENANT_STREAMS, ControlPlane
from tartarus.daemon.logs import JsonFormatter, new_request_id, request_id
from tartarus.daemon.manager import SandboxManager
from tartarus.daemon.requests import synced_before_answer
from tartarus.errors import QuotaExceeded


def test_quota_names_the_limit_that_breaks() -> None:
    limits = quotas.Limits(max_sandboxes=3, max_vcpus=4, max_memory_mib=None)
    quotas.check("t", limits, quotas.Usage(2, 2, 10_000), quotas.Usage(1, 2, 512))  # exactly at the limits
    with pytest.raises(QuotaExceeded, match=r"max_vcpus=4 exceeded: 2 vCPUs in use \+ 3 requested"):
        quotas.check("t", limits, quotas.Usage(2, 2, 0), quotas.Usage(1, 3, 512))
    with pytest.raises(QuotaExceeded, match="max_sandboxes=3"):
        quotas.check("t", limits, quotas.Usage(3, 0, 0), quotas.Usage(1, 1, 1))
    quotas.check("t", quotas.Limits(), quotas.Usage(10**6, 10**6, 10**9), quotas.Usage(1, 64, 65536))


def test_a_wake_and_a_checkpoint_are_checked_only_on_what_they_add() -> None:
    limits = quotas.Limits(max_sandboxes=1, max_vcpus=2, max_checkpoints=1)
    wake = quotas.Usage(0, 2, 512)
    quotas.check("t", limits, quotas.Usage(1, 0, 0), wake)  # its place is already counted
    quotas.check("t", limits, quotas.Usage(3, 0, 0), wake)  # even over a lowered max_sandboxes
    with pytest.raises(QuotaExceeded, match=r"max_vcpus=2 exceeded: 1 vCPUs in use \+ 2 requested"):
        quotas.check("t", limits, quotas.Usage(1, 1, 0), wake)
    quotas.check("t", limits, quotas.Usage(5, 2, 0), quotas.Usage(checkpoints=1))
    with pytest.raises(QuotaExceeded, match="max_checkpoints=1 exceeded: 1 checkpoints in use"):
        quotas.check("t", limits, quotas.Usage(checkpoints=1), quotas.Usage(checkpoints=1))
    book = quotas.Reservations()
    with book.hold("a", quotas.Usage(checkpoints=1)):
        assert book.pending("a") == quotas.Usage(checkpoints=1)
    assert book.pending("a") == quotas.Usage()


def test_reservations_count_until_released_even_on_error() -> None:
    book = quotas.Reservations()
    with book.hold("a", quotas.Usage(1, 2, 512)):
        with book.hold("a", quotas.Usage(1, 1, 256)):
            assert book.pending("a") == quotas.Usage(2, 3, 768)
        assert book.pending("b") == quotas.Usage()
    with pytest.raises(RuntimeError), book.hold("a", quotas.Usage(1, 1, 1)):
        raise RuntimeError("create failed")
    assert book.pending("a") == quotas.Usage()


def test_json_log_lines_carry_the_request_id_and_extra_fields() -> None:
    record = logging.LogRecord("tartarus.x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.tenant = "acme"
    token = request_id.set("req-1")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id.reset(token)
    assert line["msg"] == "hello world" and line["level"] == "info" and line["request_id"] == "req-1"
    assert line["tenant"] == "acme" and line["time"].endswith("Z")


def test_request_ids_accept_sane_tokens_only() -> None:
    assert new_request_id("abc-123:x.y_z") == "abc-123:x.y_z"
    for hostile in ("has space", "new\nline", "x" * 129, "", None):
        made = new_request_id(hostile)
        assert made != hostile and len(made) == 16


def test_audit_lines_are_appended_whole(tmp_path: Path) -> None:
    audit.record(tmp_path, "sandbox.create", tenant="a", target="sb-1")
    audit.record(tmp_path, "sandbox.destroy", tenant="a", target="sb-1", note="line\nbreak")
    lines = (tmp_path / "audit.log").read_text().splitlines()
    assert [json.loads(line)["action"] for line in lines] == ["sandbox.create", "sandbox.destroy"]
    assert (tmp_path / "audit.log").stat().st_mode & 0o777 == 0o600


def test_streams_per_tenant_are_limited_until_released(tmp_path: Path) -> None:
    control = ControlPlane(tmp_path, SandboxManager(tmp_path))
    alice = SimpleNamespace(state=SimpleNamespace(principal=Principal("k1", "alice", admin=False)))
    bob = SimpleNamespace(state=SimpleNamespace(principal=Principal("k2", "bob", admin=False)))
    releases = [control.open_stream(alice) for _ in range(MAX_TENANT_STREAMS)]  # type: ignore[arg-type]
    with pytest.raises(QuotaExceeded, match=f"'alice' already has {MAX_TENANT_STREAMS} streams open") as e:
        control.open_stream(alice)  # type: ignore[arg-type]
    assert (e.value.status, e.value.code) == (429, "quota_exceeded")
    control.open_stream(bob)()  # type: ignore[arg-type]  # another tenant's streams are its own
    releases[0]()
    releases[0]()  # releasing twice frees one slot, not two
    control.open_stream(alice)  # type: ignore[arg-type]
    with pytest.raises(QuotaExceeded):
        control.open_stream(alice)  # type: ignore[arg-type]


def test_audit_lines_are_written_at_once_and_fsynced_in_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines appended while an fsync runs share the next one; `synced` waits for the fsync covering its
    line, and a line is in the file (it survives the daemon being killed) before `append` returns."""
    flushing, release = threading.Event(), threading.Event()
    flushes = 0
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        nonlocal flushes
        flushes += 1
        flushing.set()
        assert release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)

    async def scenario() -> None:
        log = audit.AuditLog(tmp_path)
        first = log.append("sandbox.create", target="sb-0")
        assert json.loads((tmp_path / "audit.log").read_text())["target"] == "sb-0"
        assert flushing.wait(10)  # the first line's fsync is under way (and held)
        lines = [log.append("sandbox.create", target=f"sb-{i}") for i in range(1, 6)]
        waiter = asyncio.ensure_future(log.synced(lines[-1]))
        await asyncio.sleep(0.05)
        assert not waiter.done()  # the fsync under way does not cover lines written after it began
        release.set()
        await asyncio.wait_for(asyncio.gather(log.synced(first), waiter), 10)
        await asyncio.to_thread(log.close)

    asyncio.run(scenario())
    assert flushes == 2  # six lines, two fsyncs: the five written during the first shared the second
    lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [e["target"] for e in lines] == [f"sb-{i}" for i in range(6)]


def test_audit_log_close_fsyncs_what_is_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    log = audit.AuditLog(tmp_path)
    log.append("tenant.quota", tenant="a")
    log.close()
    assert synced  # nothing written is left unflushed at close
    with pytest.raises(RuntimeError, match="closed"):
        log.append("tenant.quota", tenant="a")


@pytest.mark.parametrize(
    ("route", "synced"),
    [
        ("/v1/sandboxes", False),
        ("/v1/sandboxes/{sandbox_id}", False),
        ("/v1/sandboxes/{sandbox_id}/exec", False),
        ("/v1/checkpoints/{checkpoint_id}/sandboxes", False),
        ("/v1/sandboxes/{sandbox_id}/quarantine", True),
        ("/v1/sandboxes/{sandbox_id}/release", True),
        ("/v1/sandboxes/{sandbox_id}/tokens", True),
        ("/v1/keys", True),
        ("/v1/keys/{key_id}", True),
        ("/v1/tenants/{tenant}/quota", True),
        ("/v1/images", True),
        ("/v1/gc", True),
    ],
)
def test_credentials_tenancy_and_verdicts_are_fsynced_before_they_are_answered(
    route: str, synced: bool
) -> None:
    assert synced_before_answer(route) is synced
