"""The conversion worker itself can write only its own output, whatever its path guard does.

The worker runs here with its guard deliberately broken (a `_resolve` that lets the kernel follow an
entry's absolute symlink out of the image root, as the real one must not): an entry aimed at a canary
this test makes outside the output fails with EROFS and leaves it unchanged, while the same escape aimed
inside the output goes through — so the broken guard really escapes, and the sealed mount namespace
(images/seal.py) is what stops it.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future
from pathlib import Path

import pytest

from tartarus.images import testing as t
from tartarus.images import worker
from tartarus.images.errors import ImageError
from tartarus.images.layers import Limits
from tartarus.images.worker import LayerInput, run_build

BROKEN_GUARD = """
import os
from tartarus.images import layers
def _resolve(self, parts, *, create):  # no guard: the kernel follows symlinks from the host's root
    path = "/".join(parts) or "."
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self._root_fd), path
layers.LayerApplier._resolve = _resolve
"""


def layer_file(path: Path, entries: list[t.Entry]) -> Future[LayerInput]:
    data = t.tar_bytes(entries)
    path.write_bytes(data)
    future: Future[LayerInput] = Future()
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    future.set_result(LayerInput(str(path), None, None, len(data), diff_id, "layer 0"))
    return future


def test_a_broken_path_guard_cannot_write_outside_the_workers_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    canary = outside / "canary"
    canary.write_text("precious\n")
    work = tmp_path / "work"
    (work / "reachable").mkdir(parents=True)
    layer = layer_file(
        tmp_path / "layer.tar",
        [
            t.symlink("inward", str(work / "reachable")),
            t.file("inward/proof", b"escaped\n"),
            t.symlink("outward", str(outside)),
            t.file("outward/canary", b"overwritten\n"),
        ],
    )
    boot = worker._BOOT.replace(
        "from tartarus.images.worker import main", BROKEN_GUARD + "from tartarus.images.worker import main"
    )
    monkeypatch.setattr(worker, "_BOOT", boot)
    with pytest.raises(ImageError, match="Read-only file system"):
        run_build(work, "ext4", [layer], limits=Limits(max_bytes=2**30))
    assert (work / "reachable" / "proof").read_text() == "escaped\n"  # the guard was broken indeed
    assert canary.read_text() == "precious\n"
    assert sorted(p.name for p in outside.iterdir()) == ["canary"]
