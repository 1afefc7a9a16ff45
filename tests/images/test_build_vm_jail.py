"""A template's build VM and a snapshot's VM run jailed like a sandbox's VMM (their own uid, no
capability, a root of their own), and hand what they wrote back to the daemon when they are done."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from tartarus.paths import cache_dir
from tartarus.runtime import jail
from tartarus.sandbox.sandbox import Sandbox
from tartarus.snapshots.build import ensure_snapshot
from tartarus.snapshots.snapshot import snapshot_key
from tartarus.templates.build import build_template
from tartarus.templates.built import remove_template
from tartarus.templates.spec import TemplateSpec
from tests.conftest import qemu_pids

pytestmark = pytest.mark.vm


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _building(kind: str) -> int:
    """The one QEMU building a `kind` artefact: its files are in that cache's build directory (a
    `cached` build runs in `<cache>/<kind>/.<key>.XXXX` until it is done)."""
    under = f"{cache_dir() / kind}/.".encode()
    (pid,) = [p for p in qemu_pids() if under in Path(f"/proc/{p}/cmdline").read_bytes()]
    return pid


def _confinement(pid: int) -> tuple[int, set[Path]]:
    """The VMM's uid (after checking it is nobody's but its own, capability-free, no_new_privs and
    seccomp-filtered) and what its root holds outside /usr and /dev."""
    status = _status(pid)
    (uid,) = set(status["Uid"].split())
    (gid,) = set(status["Gid"].split())
    assert uid != "0" and gid != "0"
    assert {status[c] for c in ("CapEff", "CapPrm", "CapBnd", "CapAmb")} == {"0" * 16}
    assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2")
    root = f"/proc/{pid}/root"
    found = set()
    for parent, dirs, files in os.walk(root):
        rel = Path("/") / os.path.relpath(parent, root)
        if rel == Path("/"):
            dirs[:] = [d for d in dirs if d not in ("usr", "dev")]
        found |= {rel / name for name in files}
    return int(uid), found


def test_template_and_snapshot_build_vms_are_jailed_and_give_their_files_back(
    python_ref: str, tmp_path: Path
) -> None:
    token = secrets.token_hex(6)  # a new step: the build VM runs (an unchanged one would be cached)
    spec = TemplateSpec.model_validate(
        {
            "name": "jailed-build",
            "base": {"image": python_ref},
            # the host's resolvers through user networking's DNS forwarder, which reads its resolv.conf
            "steps": [f"echo {token} > /opt/token", "getent hosts pypi.org > /opt/dns || true"],
            "interpreter": {"preload": ["json"]},
        }
    )
    seen: dict[str, tuple[int, set[Path]]] = {}

    def progress(message: str) -> None:  # called while the VM it reports on runs
        if "build VM up" in message:
            seen["steps"] = _confinement(_building("rootfs"))
        elif "booted in" in message:
            seen["snapshot"] = _confinement(_building("snapshots"))

    template = build_template(spec, progress)
    try:
        snapshot = ensure_snapshot(template, progress)
        assert set(seen) == {"steps", "snapshot"}
        (steps_uid, steps_files), (snap_uid, snap_files) = seen["steps"], seen["snapshot"]
        assert steps_uid != snap_uid and not jail.is_claimed(steps_uid) and not jail.is_claimed(snap_uid)
        # the image it builds, its console log, the kernel and initramfs, and the host's resolver for
        # user networking's DNS: no other host configuration, no state
        assert Path("/etc/resolv.conf") in steps_files
        assert not [p for p in steps_files if p.is_relative_to("/etc") and p != Path("/etc/resolv.conf")]
        assert not [p for p in snap_files if p.is_relative_to("/etc")]
        assert any(p.name == "rootfs.img" for p in steps_files)
        assert {p.name for p in snap_files} >= {"memory", "layer.ext4", "console.log"}
        for made in (template.rootfs, snapshot.memory, snapshot.layer):  # no VMM uid owns them now
            assert made.stat().st_uid == os.geteuid(), made

        async def restored() -> str | None:
            sb = await Sandbox.restore(snapshot, template, tmp_path)
            try:
                interpreter = await sb.code_interpreter()
                code = "open('/opt/token').read().strip(), open('/opt/dns').read().split()[:1]"
                return (await interpreter.run_code(code)).result
            finally:
                await sb.destroy()

        host = subprocess.run(["getent", "hosts", "pypi.org"], capture_output=True, text=True).stdout
        assert asyncio.run(restored()) == repr((token, host.split()[:1]))
        assert not qemu_pids(tmp_path)
    finally:
        remove_template("jailed-build")
        for built in (template.rootfs.parent, cache_dir() / "snapshots" / snapshot_key(template)):
            shutil.rmtree(built, ignore_errors=True)  # this token's artefacts: no other run uses them
