"""Issue 14, defect 3, without a VM: a state dir an older version left is tightened, a new one is private
whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tartarus.private import make_private, write_private


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_an_older_state_dir_is_tightened(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "sandboxes" / "sb-1").mkdir(parents=True)
    (state / "sandboxes" / "sb-1" / "sandbox.json").write_text("{}")
    (state / "node-id").write_text("n\n")
    canary = tmp_path / "outside"
    canary.write_text("not the daemon's")
    canary.chmod(0o644)
    os.symlink(canary, state / "link")
    for path in (state, state / "sandboxes", state / "sandboxes" / "sb-1"):
        path.chmod(0o755)
    for path in (state / "node-id", state / "sandboxes" / "sb-1" / "sandbox.json"):
        path.chmod(0o644)
    make_private(state)
    assert _mode(state) == 0o700
    assert _mode(state / "sandboxes") == _mode(state / "sandboxes" / "sb-1") == 0o700
    assert _mode(state / "node-id") == _mode(state / "sandboxes" / "sb-1" / "sandbox.json") == 0o600
    assert _mode(canary) == 0o644  # a symlink is not followed


def test_a_new_state_dir_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        make_private(tmp_path / "a" / "state")
        write_private(tmp_path / "a" / "state" / "f", "x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a" / "state") == 0o700
    assert _mode(tmp_path / "a" / "state" / "f") == 0o600
