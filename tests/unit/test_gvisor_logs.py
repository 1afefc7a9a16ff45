"""Why a gVisor sandbox failed to start, read from runsc's per-command logs (gvisor/container.py)."""

from __future__ import annotations

from pathlib import Path

from tartarus.gvisor.container import fatal_error


def test_the_first_fatal_error_is_the_cause_not_the_later_echoes(tmp_path: Path) -> None:
    (tmp_path / "create.log").write_text(
        "I1207 11:38:57.060000   27098 main.go:1] starting\n"
        "W1207 11:38:57.074830   27098 util.go:64] FATAL ERROR: creating container: sandbox: EOF\n"
    )
    (tmp_path / "boot.log").write_text(
        "W1207 11:38:57.041732       1 util.go:64] FATAL ERROR: error setting up FS: stat /x: no such file\n"
    )
    assert fatal_error(tmp_path) == "error setting up FS: stat /x: no such file"


def test_no_fatal_error_logged_is_none(tmp_path: Path) -> None:
    (tmp_path / "boot.log").write_text("I1207 11:38:57.041732       1 loader.go:1] all fine\n")
    assert fatal_error(tmp_path) is None
    assert fatal_error(tmp_path / "missing") is None
