"""A VMM's long-lived handles stay clear of the descriptor numbers select() can take (libnftables
uses it, and glibc aborts the process on a descriptor >= FD_SETSIZE)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tartarus.runtime.vm import FD_SETSIZE, above_select


def test_a_handle_moves_above_fd_setsize_and_the_low_number_is_freed() -> None:
    r, w = os.pipe()
    try:
        high = above_select(r)
        assert high >= FD_SETSIZE
        with pytest.raises(OSError):
            os.fstat(r)  # the low number is free again
        os.write(w, b"x")
        assert os.read(high, 1) == b"x"  # the same pipe
        assert not os.get_inheritable(high)
        os.close(high)
    finally:
        os.close(w)


def test_under_a_low_fd_limit_the_handle_stays_where_it_is() -> None:
    script = (
        "import os, resource\n"
        "from tartarus.runtime.vm import above_select\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (512, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "r, w = os.pipe()\n"
        "print(above_select(r) == r, os.fstat(r) is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]
