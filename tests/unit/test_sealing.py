"""Issue 14, defect 3, without a VM: the env seal's round trip, records from before sealing still load,
and the key file is private and kept."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest

from tartarus.gvisor.spec import BundleSpec
from tartarus.private import write_private
from tartarus.sandbox import descriptor
from tartarus.sandbox.saved import META, SavedSandbox, list_saved
from tartarus.sandbox.spec import SandboxSpec
from tartarus.sealing import KEY_FILE, EnvSeal, SealError
from tartarus.templates.built import Template

ENV = {"API_TOKEN": "tok-123-secret", "EMPTY": "", "UNICODE": "héllo ✓"}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_env_round_trips_sealed(tmp_path: Path) -> None:
    seal = EnvSeal.for_state_dir(tmp_path)
    sealed = seal.seal(ENV, "sb-1")
    assert isinstance(sealed, str) and "tok-123-secret" not in sealed and "API_TOKEN" not in sealed
    assert seal.open(sealed, "sb-1") == ENV
    assert seal.seal(ENV, "sb-1") != sealed  # a fresh nonce each time


def test_a_sealed_env_opens_only_for_its_sandbox_and_key(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    seal = EnvSeal.for_state_dir(tmp_path / "a")
    sealed = seal.seal(ENV, "sb-1")
    with pytest.raises(SealError):
        seal.open(sealed, "sb-2")  # moved into another sandbox's record
    with pytest.raises(SealError):
        EnvSeal.for_state_dir(tmp_path / "b").open(sealed, "sb-1")  # another daemon's key
    tampered = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    with pytest.raises(SealError):
        seal.open(tampered, "sb-1")


def test_the_key_file_is_private_and_kept(tmp_path: Path) -> None:
    old = os.umask(0)  # whatever the process's umask, the key is 0600
    try:
        seal = EnvSeal.for_state_dir(tmp_path)
    finally:
        os.umask(old)
    assert _mode(tmp_path / KEY_FILE) == 0o600
    sealed = seal.seal(ENV, "sb-1")
    assert EnvSeal.for_state_dir(tmp_path).open(sealed, "sb-1") == ENV  # read back, not replaced
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]  # no temporary left


def _template() -> Template:
    return Template("python-ds", "k1", Path("/pins/k/rootfs"), "ext4", preload=["numpy"])


def _saved(path: Path, env: dict[str, str]) -> SavedSandbox:
    return SavedSandbox(
        path=path,
        kind="hibernation",
        id="sb-1",
        sandbox_id="sb-1",
        template=_template(),
        snapshot_key="k",
        interpreter_pid=7,
        vcpus=1,
        memory_mib=512,
        spec=SandboxSpec("python-ds", env=env),
        created_at=1.0,
        captured_at=2.0,
        state_bytes=3,
        layer_bytes=4,
    )


def test_an_image_record_is_sealed_and_reads_back(tmp_path: Path) -> None:
    seal = EnvSeal.for_state_dir(tmp_path)
    saved = _saved(tmp_path / "hibernated" / "sb-1", ENV)
    saved.path.mkdir(parents=True)
    write_private(saved.path / META, saved.to_json(seal))
    assert b"tok-123-secret" not in (saved.path / META).read_bytes()
    assert list_saved(tmp_path / "hibernated", seal) == [saved]


def test_a_gvisor_capture_record_reads_back_with_its_container_spec(tmp_path: Path) -> None:
    seal = EnvSeal.for_state_dir(tmp_path)
    bundle = BundleSpec(Path("/trees/k/rootfs"), Path("/cache/agent"), "python-ds", {"A": "1"}, "/root")
    saved = dataclasses.replace(_saved(tmp_path / "hibernated" / "sb-1", ENV), bundle=bundle)
    saved.path.mkdir(parents=True)
    write_private(saved.path / META, saved.to_json(seal))
    assert list_saved(tmp_path / "hibernated", seal) == [saved]


def test_an_image_record_from_before_sealing_still_loads(tmp_path: Path) -> None:
    saved = _saved(tmp_path / "sb-1", ENV)
    saved.path.mkdir()
    data = json.loads(saved.to_json(EnvSeal.for_state_dir(tmp_path)))
    del data["spec"], data["exposed"]
    data["env"], data["request"] = ENV, {}  # as rev 822c959 wrote it
    (saved.path / META).write_text(json.dumps(data))
    assert SavedSandbox.load(saved.path, EnvSeal.for_state_dir(tmp_path)) == saved


def test_a_descriptor_from_before_sealing_still_loads(tmp_path: Path) -> None:
    workdir = tmp_path / "sb-1"
    workdir.mkdir()
    old = {"version": 1, "id": "sb-1", "options": {"env": ENV, "vcpus": 1}}
    (workdir / descriptor.DESCRIPTOR).write_text(json.dumps(old))
    data = descriptor.read(workdir, EnvSeal.for_state_dir(tmp_path))
    assert data is not None and data["options"]["env"] == ENV


def test_a_descriptor_whose_env_does_not_open_is_not_read(tmp_path: Path) -> None:
    workdir = tmp_path / "sb-1"
    workdir.mkdir()
    (tmp_path / "other").mkdir()
    sealed = EnvSeal.for_state_dir(tmp_path / "other").seal(ENV, "sb-1")
    data = {"version": descriptor.VERSION, "id": "sb-1", "spec": {"env": sealed}}
    (workdir / descriptor.DESCRIPTOR).write_text(json.dumps(data))
    assert descriptor.read(workdir, EnvSeal.for_state_dir(tmp_path)) is None
