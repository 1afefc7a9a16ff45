"""The SDK's typed results: parsed from the JSON the daemon sends, field names the API's, a newer
daemon's extra fields ignored, and a malformed answer a clear error."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from tartarus.errors import TartarusError
from tartarus.paths import REPO_ROOT
from tartarus.sdk import CheckpointInfo, ExposedPort, FileInfo, FileList, SandboxInfo
from tartarus.sdk.results import execution_from_json
from tartarus.wire import Execution, ExecutionError

# As `POST /v1/sandboxes/{id}/hibernate` answers (integral numbers as JSON integers), plus a field a
# newer daemon might add.
HIBERNATED = """{
  "id": "sb-1a2b", "template": "python-ds", "state": "hibernated", "created_at": 1765100000,
  "vcpus": 2, "memory_mib": 512, "network": "allow", "restored": true,
  "timings_ms": {"state_loaded": 12, "first_answer": 30.5}, "tenant": "alice", "labels": {"team": "ml"},
  "idle_timeout_s": 300, "timeout": 600.0, "expires_at": 1765100600.25, "ended_at": null, "error": null,
  "quarantined": true, "quarantine_reason": "exfiltration suspected", "disk_bytes": 7340032,
  "placement": {"host": "h2", "zone": "b"}
}"""


def test_a_sandbox_answer_becomes_a_sandbox_info() -> None:
    info = SandboxInfo.from_json(json.loads(HIBERNATED))
    assert info == SandboxInfo(
        id="sb-1a2b",
        template="python-ds",
        state="hibernated",
        created_at=1765100000.0,
        vcpus=2,
        memory_mib=512,
        network="allow",
        restored=True,
        timings_ms={"state_loaded": 12.0, "first_answer": 30.5},
        tenant="alice",
        labels={"team": "ml"},
        idle_timeout_s=300.0,
        timeout=600.0,
        expires_at=1765100600.25,
        quarantined=True,
        quarantine_reason="exfiltration suspected",
        disk_bytes=7340032,
    )
    assert isinstance(info.created_at, float) and isinstance(info.timings_ms["state_loaded"], float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.state = "running"  # type: ignore[misc]


def test_only_the_required_fields_give_the_apis_defaults() -> None:
    info = SandboxInfo.from_json(
        {"id": "sb-1", "template": "t", "state": "running", "created_at": 1.5, "vcpus": 1, "memory_mib": 256}
    )
    assert (info.network, info.restored, info.quarantined, info.labels, info.timings_ms) == (
        "none",
        False,
        False,
        {},
        {},
    )
    assert (info.tenant, info.expires_at, info.disk_bytes) == (None, None, None)


def test_a_listing_and_a_fork_answer_are_lists_of_sandbox_infos() -> None:
    one = json.loads(HIBERNATED)
    listed = SandboxInfo.list_from_json({"sandboxes": [one, {**one, "id": "sb-2", "state": "running"}]})
    assert [(s.id, s.state) for s in listed] == [("sb-1a2b", "hibernated"), ("sb-2", "running")]
    assert SandboxInfo.list_from_json({"sandboxes": []}) == []


def test_a_listing_reports_that_it_was_truncated() -> None:
    answer = json.loads(
        """{"entries": [
             {"name": "a.txt", "type": "file", "mode": 33188, "size": 2, "mtime_ns": 1765100000123456789,
              "uid": 0, "gid": 0, "link": null, "xattrs": {}},
             {"name": "l", "type": "symlink", "mode": 41471, "size": 5, "mtime_ns": 1, "uid": 1000,
              "gid": 1000, "link": "a.txt"}],
            "truncated": true, "next_cursor": "b"}"""
    )
    listing = FileList.from_json(answer)
    assert listing.truncated is True
    assert listing.entries == (
        FileInfo("a.txt", "file", 0o100644, 2, 1765100000123456789, 0, 0),
        FileInfo("l", "symlink", 0o120777, 5, 1, 1000, 1000, link="a.txt"),
    )
    assert FileList.from_json({"entries": []}) == FileList(entries=(), truncated=False)


def test_checkpoint_exposed_port_and_code_answers() -> None:
    checkpoint = CheckpointInfo.from_json(
        json.loads(
            '{"id": "ck-9", "sandbox_id": "sb-1", "template": "python-ds", "captured_at": 1765100001.5,'
            ' "disk_bytes": 104857600, "ttl_s": null, "compression": "zstd"}'
        )
    )
    assert checkpoint == CheckpointInfo("ck-9", "sb-1", "python-ds", 1765100001.5, 104857600)
    port = ExposedPort.from_json(
        json.loads(
            '{"port": 8000, "host": "127.0.0.1", "host_port": 40123, "traffic_token": "tt", "proto": 1}'
        )
    )
    assert (port.address, port.traffic_token) == ("127.0.0.1:40123", "tt")
    ran = execution_from_json(
        json.loads(
            '{"stdout": "", "stderr": "", "result": null, "duration_ms": 3,'
            ' "error": {"name": "ZeroDivisionError", "value": "division by zero", "traceback": "Tb"}}'
        )
    )
    assert ran == Execution("", "", None, ExecutionError("ZeroDivisionError", "division by zero", "Tb"))
    assert execution_from_json({"stdout": "4\n", "stderr": "", "result": "2", "error": None}).error is None


MINIMAL = {"id": "s", "template": "t", "state": "running", "created_at": 1, "vcpus": 1, "memory_mib": 256}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"id": None}, "'id'"),
        ({"vcpus": "1"}, "vcpus"),
        ({"vcpus": True}, "vcpus"),  # JSON true is no number, though Python's bool is an int
        ({"created_at": "now"}, "created_at"),
        ({"labels": {"a": 1}}, "labels"),
        ({"quarantined": "yes"}, "quarantined"),
    ],
)
def test_a_malformed_answer_is_an_error_naming_the_field(change: dict[str, Any], named: str) -> None:
    answer = {k: v for k, v in {**MINIMAL, **change}.items() if v is not None}
    with pytest.raises(TartarusError, match=named):
        SandboxInfo.from_json(answer)
    with pytest.raises(TartarusError, match="not a JSON object"):
        SandboxInfo.from_json(["sb-1"])


def test_a_malformed_entry_in_a_listing_is_an_error() -> None:
    with pytest.raises(TartarusError, match="file info has no 'size'"):
        FileList.from_json(
            {"entries": [{"name": "a", "type": "file", "mode": 0, "mtime_ns": 0, "uid": 0, "gid": 0}]}
        )
    with pytest.raises(TartarusError, match="sandboxes"):
        SandboxInfo.list_from_json({"sandboxes": None})


@pytest.mark.parametrize(
    ("result", "schema"),
    [
        (SandboxInfo, "SandboxInfo"),
        (CheckpointInfo, "CheckpointInfo"),
        (FileInfo, "FileInfoModel"),
        (FileList, "FileList"),
        (ExposedPort, "ExposedPort"),
    ],
)
def test_each_result_has_exactly_the_fields_of_its_api_schema(result: type[Any], schema: str) -> None:
    """docs/openapi.json is the reference: a field the API adds or renames shows up here."""
    schemas = json.loads((REPO_ROOT / "docs" / "openapi.json").read_text())["components"]["schemas"]
    properties = schemas[schema]["properties"]
    fields = {f.name: f for f in dataclasses.fields(result)}
    assert set(fields) == set(properties)
    required = {name for name, f in fields.items() if f.default is f.default_factory is dataclasses.MISSING}
    assert required == set(schemas[schema]["required"])


def test_process_list_reads_each_command_and_refuses_mistyped_argv() -> None:
    from tartarus.sdk.results import processes_from_json

    body = {
        "processes": [
            {
                "pid": 7,
                "argv": ["cat"],
                "cwd": "/tmp",
                "background": True,
                "pty": False,
                "stdin": True,
                "attached": False,
            }
        ]
    }
    (listed,) = processes_from_json(body)
    assert (listed.pid, listed.argv, listed.cwd, listed.background, listed.stdin) == (
        7,
        ("cat",),
        "/tmp",
        True,
        True,
    )
    with pytest.raises(TartarusError, match="argv"):
        processes_from_json({"processes": [{**body["processes"][0], "argv": [1]}]})
