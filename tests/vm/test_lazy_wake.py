"""Lazy wake: on a state directory with reflinks a woken VMM maps a memory file holding the sandbox's
pages and reads them when its guest touches them; on ext4 the pages are copied in before it runs."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartarus.daemon.config import DaemonConfig
from tartarus.daemon.server import daemon_thread
from tartarus.hibernation import image, lazy, reflink
from tartarus.hibernation.dirty import own_pages, ram_mapping
from tartarus.sdk import Sandbox
from tests.conftest import qemu_pids
from tests.vm.test_hibernation import _check_state, _give_state

BALLAST = "import hashlib, os\nballast = os.urandom(32 << 20)\ndigest = hashlib.sha256(ballast).hexdigest()"
SAME = "hashlib.sha256(ballast).hexdigest() == digest"


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    """A loop-mounted XFS with reflinks, for a state directory (this host's own disk is ext4)."""
    if shutil.which("mkfs.xfs") is None:
        pytest.fail("mkfs.xfs is missing: ./scripts/setup installs xfsprogs")
    disk, mount = tmp_path / "xfs.img", tmp_path / "xfs"
    subprocess.run(["truncate", "-s", "4G", str(disk)], check=True)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(disk)], check=True)
    mount.mkdir()
    subprocess.run(["mount", "-o", "loop", str(disk), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _vmm(state: Path, sandbox_id: str) -> int:
    (pid,) = qemu_pids(state / "sandboxes" / sandbox_id)
    return pid


def _woken_vmm(state: Path) -> tuple[int, Path]:
    """The VMM that runs a guest (a spare's owns no page yet) and the memory file it maps."""
    found = []
    for pid in qemu_pids(state / "sandboxes"):
        for memory in (state / "sandboxes").glob(f"*/{lazy.MEMORY}"):
            try:
                ram_mapping(pid, memory)
            except LookupError:
                continue
            found.append((sum(own_pages(pid, memory)), pid, memory))
    assert found, "no VMM maps a per-sandbox memory file"
    _, pid, memory = max(found)
    return pid, memory


@pytest.mark.parametrize("spares", [0, 1])
def test_wake_maps_the_saved_pages_where_reflinks_exist(xfs: Path, spares: int) -> None:
    """Without spares each wake starts a VMM on a file made for it; with them (after the first wake,
    which makes the pool) the sandbox's pages and layer are cloned into a spare's own files."""
    state, sock = xfs / "state", xfs / "api.sock"
    in_spare = 0
    with daemon_thread(state, sock, DaemonConfig(pool_size=spares)):
        sb = Sandbox.create("python-ds", url=f"unix://{sock}")
        try:
            _give_state(sb)
            sb.run_code(BALLAST)
            assert reflink.supported(state)
            for cycle in range(3):  # later ones capture a lazily woken VMM: its file's pages count too
                assert sb.hibernate().state == "hibernated"
                saved = image.read_header(state / "hibernated" / sb.id / "memory.state")
                assert saved is not None and saved.pages > (32 << 20) // 4096, f"cycle {cycle}: pages lost"
                _check_state(sb)  # wakes it
                pid, memory = _woken_vmm(state)
                in_spare += memory.parent.name != sb.id
                _, length = ram_mapping(pid, memory)
                assert length == 512 << 20
                anonymous = sum(own_pages(pid, memory))
                assert anonymous < saved.pages // 2, (
                    f"{anonymous} of {saved.pages} saved pages were copied into the VMM: not a lazy wake"
                )
                assert sb.run_code(SAME).result == "True", f"cycle {cycle}: the ballast changed"
        finally:
            sb.kill()
        assert not [p for p in (state / "sandboxes").iterdir() if not p.name.startswith("sb-")] or spares
    assert (in_spare > 0) == (spares > 0), f"{in_spare} wakes took a spare"


def test_wake_copies_the_pages_in_on_ext4(tmp_path: Path) -> None:
    state, sock = tmp_path / "state", tmp_path / "api.sock"
    with daemon_thread(state, sock, DaemonConfig(pool_size=0)):  # as above, but on this host's ext4
        assert not reflink.supported(tmp_path)
        with Sandbox.create("python-ds", url=f"unix://{sock}") as sb:
            sb.run_code(BALLAST)
            sb.hibernate()
            assert sb.run_code(SAME).result == "True"
            assert not (state / "sandboxes" / sb.id / lazy.MEMORY).exists()
            (pin,) = (state / "pins").iterdir()
            pid = _vmm(state, sb.id)
            ram_mapping(pid, pin / "memory")  # the pinned template's file, the pages copied in
            assert sum(own_pages(pid, pin / "memory")) > (32 << 20) // 4096
