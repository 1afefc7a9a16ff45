"""The pure parts of hibernated sandboxes in the object store (`roles.stored`): the object store's
configuration, the env's transport seal and a snapshot build's fingerprint. The upload and the wake
themselves are tested with real agents, VMs and SeaweedFS in tests/cluster/test_stored.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tartarus.errors import InvalidArgument
from tartarus.roles.stored import S3_ENV, fingerprint, s3_from_env, transport_seal
from tartarus.roles.token import AgentToken
from tartarus.sealing import SealError

TOKEN = AgentToken("t" * 40)


def test_no_object_store_is_the_default_and_a_partial_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*S3_ENV, "TARTARUS_S3_SECRET_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert s3_from_env() is None
    monkeypatch.setenv("TARTARUS_S3_ENDPOINT", "http://127.0.0.1:8333")
    monkeypatch.setenv("TARTARUS_S3_BUCKET", "state")
    with pytest.raises(InvalidArgument) as refused:
        s3_from_env()
    assert (
        "TARTARUS_S3_ACCESS_KEY" in refused.value.message
        and "TARTARUS_S3_SECRET_KEY" in refused.value.message
    )
    monkeypatch.setenv("TARTARUS_S3_ACCESS_KEY", "ak")
    monkeypatch.setenv("TARTARUS_S3_SECRET_KEY", "very-secret")
    config = s3_from_env()
    assert config is not None and (config.endpoint, config.bucket, config.secret_key) == (
        "http://127.0.0.1:8333",
        "state",
        "very-secret",
    )
    assert "very-secret" not in repr(config)


def test_the_transport_seal_opens_on_any_agent_with_the_token_and_nowhere_else() -> None:
    sealed = transport_seal(TOKEN).seal({"API_KEY": "s3cr3t"}, "sb-1")
    assert "s3cr3t" not in sealed
    assert transport_seal(AgentToken("t" * 40)).open(sealed, "sb-1") == {"API_KEY": "s3cr3t"}
    with pytest.raises(SealError):
        transport_seal(AgentToken("u" * 40)).open(sealed, "sb-1")
    with pytest.raises(SealError):
        transport_seal(TOKEN).open(sealed, "sb-2")  # moved into another sandbox's record


def test_a_snapshot_build_is_told_apart_by_its_memory_not_its_name(tmp_path: Path) -> None:
    def memory(name: str, data: bytes, at: int) -> Path:
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(64 << 20)
            f.seek(at)
            f.write(data)
        return path

    page = os.urandom(4096)
    first, same, moved = memory("a", page, 8 << 20), memory("b", page, 8 << 20), memory("c", page, 9 << 20)
    other = memory("d", os.urandom(4096), 8 << 20)
    assert fingerprint(first) == fingerprint(same)
    assert len({fingerprint(first), fingerprint(moved), fingerprint(other)}) == 3
