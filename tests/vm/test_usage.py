"""`GET /v1/sandboxes/{id}/metrics` (`Sandbox.metrics`): what a real sandbox uses, measured now."""

from __future__ import annotations

import pytest

from tartarus.errors import Conflict
from tartarus.sdk import Sandbox


def test_metrics_follow_what_the_guest_does(daemon_url: str) -> None:
    with Sandbox.create("python-ds", url=daemon_url) as sb:
        idle = sb.metrics()
        assert idle.cpu_count == 1 and 0 <= idle.cpu_used_pct <= 100
        assert 400 << 20 < idle.mem_total_bytes <= 512 << 20  # the guest's 512 MiB, less its kernel's
        assert 0 < idle.mem_used_bytes < idle.mem_total_bytes
        assert 0 < idle.disk_used_bytes < idle.disk_total_bytes
        sb.metrics()  # starts the window the busy loop below falls in
        sb.run_code("import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1.5: pass")
        sb.commands.run("head -c 32M /dev/urandom > /root/blob && sync")
        busy = sb.metrics()
        assert busy.cpu_used_pct > 50, busy  # the guest's one vCPU was busy for most of the window
        assert busy.disk_used_bytes >= idle.disk_used_bytes + (30 << 20)
        assert busy.timestamp > idle.timestamp
        sb.hibernate()
        with pytest.raises(Conflict, match="not running"):
            sb.metrics()
        assert sb.refresh().state == "hibernated"  # measuring did not wake it
