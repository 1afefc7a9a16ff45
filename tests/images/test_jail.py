"""The hostile-image tests' safety net holds: in the jail only the named directories can be written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.images.jail import jailed, write_file


def test_the_jail_writes_only_where_it_may(tmp_path: Path) -> None:
    work, sealed = tmp_path / "work", tmp_path / "sealed"
    work.mkdir()
    sealed.write_text("precious\n")
    jailed([work], write_file, work / "made", b"inside")
    assert (work / "made").read_bytes() == b"inside"
    with pytest.raises(OSError, match="Read-only file system"):
        jailed([work], write_file, sealed, b"overwritten")
    with pytest.raises(OSError, match="Read-only file system"):
        jailed([work], write_file, Path("/etc/tartarus-jail-test"), b"x")
    assert sealed.read_text() == "precious\n" and not Path("/etc/tartarus-jail-test").exists()
    # The jail's mounts were its own: the machine can still write where the jail could not.
    sealed.write_text("still writable here\n")
