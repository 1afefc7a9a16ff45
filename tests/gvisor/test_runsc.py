"""The gVisor probe against the real runsc: it must say yes only when a container actually ran."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from tartarus.gvisor.runsc import probe, runsc_binary

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")


def _runsc_processes() -> str:
    return subprocess.run(["pgrep", "-a", "runsc"], capture_output=True, text=True).stdout


def test_probe_runs_a_container_on_the_systrap_platform() -> None:
    support = probe()
    assert support.works, support.reason
    assert "systrap" in support.reason


def test_probe_says_no_with_runscs_own_reason_when_the_container_cannot_start() -> None:
    support = probe(platform="no-such-platform")
    assert not support.works
    assert "unknown platform" in support.reason


def test_a_hanging_platform_is_reported_and_killed_not_waited_for() -> None:
    # The kvm platform spins at 100 % CPU on hosts with PVM instead of KVM proper; where it does work,
    # /bin/true exits well inside the timeout and the probe says so.
    start = time.monotonic()
    support = probe(timeout=3.0, platform="kvm")
    if support.works:
        pytest.skip(f"runsc's kvm platform works on this host: {support.reason}")
    assert time.monotonic() - start < 10.0
    assert "tartarus-runsc-probe-" not in _runsc_processes()


def test_the_installed_runsc_has_systrap_which_debian_12s_own_lacks() -> None:
    version = subprocess.run([str(runsc_binary()), "--version"], capture_output=True, text=True).stdout
    assert "0.0~2022" not in version, version
