"""Limits: template defaults, request overrides, policy caps; and the audit log's format."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from tartarus import audit
from tartarus.daemon.config import DEFAULT_HIBERNATE_QUOTA_MIB, DaemonConfig
from tartarus.errors import InvalidArgument
from tartarus.limits.spec import LimitCaps, capped_timeout, checkpoint_ttl, resolve_limits


def test_request_overrides_template() -> None:
    limits = resolve_limits(template_vcpus=1, template_memory_mib=512, memory_mib=1024, ttl_s=60)
    assert (limits.vcpus, limits.memory_mib, limits.ttl_s) == (1, 1024, 60)


def test_caps_refuse_rather_than_cut() -> None:
    caps = LimitCaps(max_vcpus=2, max_ttl_s=300)
    with pytest.raises(InvalidArgument, match="vcpus=4 is over this host's policy limit of 2"):
        resolve_limits(template_vcpus=1, template_memory_mib=512, vcpus=4, caps=caps)
    with pytest.raises(InvalidArgument, match="ttl_s=301"):
        resolve_limits(template_vcpus=1, template_memory_mib=512, ttl_s=301, caps=caps)


def test_disks_grow_from_the_template_layer_up_to_the_cap() -> None:
    assert resolve_limits(template_vcpus=1, template_memory_mib=512).disk_mib == 4096
    assert resolve_limits(template_vcpus=1, template_memory_mib=512, disk_mib=8192).disk_mib == 8192
    with pytest.raises(InvalidArgument, match=r"disk_mib=2048 is below 4096.*never shrunk"):
        resolve_limits(template_vcpus=1, template_memory_mib=512, disk_mib=2048)
    with pytest.raises(InvalidArgument, match="disk_mib=16385 is over this host's policy limit of 16384"):
        resolve_limits(template_vcpus=1, template_memory_mib=512, disk_mib=16385)
    with pytest.raises(InvalidArgument, match="disk_mib=8192 is over"):
        resolve_limits(
            template_vcpus=1, template_memory_mib=512, disk_mib=8192, caps=LimitCaps(max_disk_mib=4096)
        )


def test_default_ttl_from_policy() -> None:
    caps = LimitCaps(default_ttl_s=900)
    assert resolve_limits(template_vcpus=1, template_memory_mib=512, caps=caps).ttl_s == 900


def test_a_new_timeout_is_capped_like_a_create_and_never_unlimited() -> None:
    caps = LimitCaps(max_ttl_s=172_800 / 2)
    assert capped_timeout(86_400, caps) == 86_400
    with pytest.raises(InvalidArgument, match="ttl_s=172800 is over this host's policy limit of 86400"):
        capped_timeout(172_800, caps)
    with pytest.raises(InvalidArgument, match=r"a timeout is required.*null, never, is over that limit"):
        capped_timeout(None, caps)


def test_checkpoints_get_the_policy_ttl_and_cannot_ask_past_its_cap() -> None:
    assert checkpoint_ttl(None, LimitCaps()) == 7 * 24 * 3600
    caps = LimitCaps(default_checkpoint_ttl_s=60, max_checkpoint_ttl_s=3600)
    assert (checkpoint_ttl(None, caps), checkpoint_ttl(120, caps)) == (60, 120)
    with pytest.raises(InvalidArgument, match="checkpoint ttl_s=3601 is over"):
        checkpoint_ttl(3601, caps)
    with pytest.raises(ValueError, match="default_checkpoint_ttl_s is over max_checkpoint_ttl_s"):
        LimitCaps(default_checkpoint_ttl_s=3601, max_checkpoint_ttl_s=3600)


def test_hibernation_disk_quota_is_on_unless_set_unlimited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TARTARUS_HIBERNATE_QUOTA_MIB", raising=False)
    assert DaemonConfig().hibernate_quota_bytes == DEFAULT_HIBERNATE_QUOTA_MIB << 20 == 20 << 30
    monkeypatch.setenv("TARTARUS_HIBERNATE_QUOTA_MIB", "512")
    assert DaemonConfig().hibernate_quota_bytes == 512 << 20
    monkeypatch.setenv("TARTARUS_HIBERNATE_QUOTA_MIB", "unlimited")
    assert DaemonConfig().hibernate_quota_bytes is None
    monkeypatch.setenv("TARTARUS_HIBERNATE_QUOTA_MIB", "lots")
    with pytest.raises(InvalidArgument, match="number of MiB or 'unlimited'"):
        DaemonConfig()


def test_audit_lines_are_whole_json_records(tmp_path: Path) -> None:
    def writer(n: int) -> None:
        for i in range(50):
            audit.record(tmp_path, "test.action", writer=n, i=i, note="multi\nline")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (tmp_path / "audit.log").read_text().splitlines()
    assert len(lines) == 200
    records = [json.loads(line) for line in lines]
    assert {r["action"] for r in records} == {"test.action"}
    assert all(isinstance(r["ts"], float) for r in records)
    assert audit.read(tmp_path) == records
    assert os.stat(tmp_path / "audit.log").st_mode & 0o777 == 0o600


def test_audit_read_skips_a_torn_line(tmp_path: Path) -> None:
    audit.record(tmp_path, "a")
    with (tmp_path / "audit.log").open("a") as f:
        f.write('{"ts": 1, "act')  # a write cut short by a crash
    audit.record(tmp_path, "b")
    assert [r["action"] for r in audit.read(tmp_path)] == ["a", "b"]
