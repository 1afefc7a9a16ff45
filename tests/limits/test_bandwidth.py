"""Disk bandwidth on real VMs: the policy's bytes/s and IOPS hold in the guest, after a wake too, and a
quarantine lowers them live until its release.

Every limit is set from what this run measures unthrottled first (an eighth of it, at most a cap), so a
slow machine makes the limit lower rather than the test pass by being slow. Rates are dd's own figures
(the guest's clock): `oflag=direct` writes to the writable layer, so the guest's page cache is no buffer.
Each transfer lasts about 4 s at its limit: QEMU lets a tenth of a second (plus the request in flight)
through at once, which must stay small beside the whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tartarus.daemon.config import DaemonConfig
from tartarus.daemon.server import daemon_thread
from tartarus.policy.model import BandwidthPolicy, Policy, QuarantineSettings
from tartarus.sdk import Sandbox

pytestmark = pytest.mark.vm

MIB = 1 << 20
TOLERANCE = 1.2  # measured / configured


def dd(sb: Sandbox, block: str, count: int) -> tuple[int, float]:
    """(bytes, seconds) of `count` direct writes of `block` to the sandbox's writable layer."""
    out = sb.commands.run(
        f"dd if=/dev/zero of=/root/dd.bin bs={block} count={count} oflag=direct 2>&1; rm -f /root/dd.bin",
        timeout=120,
    ).stdout
    found = re.search(r"^(\d+) bytes .* copied, ([\d.]+) s", out, re.M)
    assert found, out
    return int(found[1]), float(found[2])


def byte_rate(sb: Sandbox, nbytes: int) -> float:
    written, seconds = dd(sb, "1M", max(nbytes // MIB, 1))
    return written / seconds


def iops(sb: Sandbox, count: int) -> float:
    _, seconds = dd(sb, "4k", count)
    return count / seconds


@dataclass(frozen=True)
class Rates:
    bytes_per_s: float
    iops: float


@pytest.fixture(scope="module")
def unthrottled(daemon_url: str) -> Rates:
    """What a sandbox of a daemon without bandwidth limits reaches here (the better of two runs)."""
    with Sandbox.create("python-ds", url=daemon_url) as sb:
        return Rates(max(byte_rate(sb, 128 * MIB) for _ in range(2)), max(iops(sb, 400) for _ in range(2)))


@dataclass(frozen=True)
class Limited:
    url: str
    limits: Rates  # the policy's
    quarantined: Rates  # the quarantine settings'


@pytest.fixture(scope="module")
def limited(unthrottled: Rates, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Limited]:
    """A daemon whose policy limits disk bandwidth well below `unthrottled`, and whose quarantine lowers
    it further (with CPU and memory left alone, so only the disk limit can slow the guest)."""
    bps = min(int(unthrottled.bytes_per_s / 8), 16 * MIB)
    ops = min(int(unthrottled.iops / 8), 100)
    assert bps >= 1 * MIB and ops >= 10, f"this machine is too slow to test disk limits: {unthrottled}"
    quarantine = QuarantineSettings(
        cpu_fraction=4, memory_mib=4096, disk_bytes_per_s=bps // 4, disk_iops=None
    )
    policy = Policy(bandwidth=BandwidthPolicy(disk_bytes_per_s=bps, disk_iops=ops), quarantine=quarantine)
    state = tmp_path_factory.mktemp("bandwidth-state")
    uds = state / "api.sock"
    with daemon_thread(state, uds, DaemonConfig(pool_size=0, policy=policy)):
        yield Limited(f"unix://{uds}", Rates(bps, ops), Rates(bps // 4, ops))


def test_disk_rate_and_iops_stay_within_the_policy_after_a_wake_too(
    limited: Limited, unthrottled: Rates
) -> None:
    limits = limited.limits
    assert unthrottled.bytes_per_s >= 8 * limits.bytes_per_s and unthrottled.iops >= 8 * limits.iops
    with Sandbox.create("python-ds", url=limited.url) as sb:
        assert byte_rate(sb, int(4 * limits.bytes_per_s)) <= TOLERANCE * limits.bytes_per_s
        assert iops(sb, int(2 * limits.iops)) <= TOLERANCE * limits.iops
        sb.hibernate()
        assert sb.wake().state == "running"  # a new VMM: the limits are set on it again
        assert byte_rate(sb, int(4 * limits.bytes_per_s)) <= TOLERANCE * limits.bytes_per_s


def test_quarantine_lowers_the_disk_rate_live_and_release_restores_it(limited: Limited) -> None:
    limits, clamped = limited.limits, limited.quarantined
    with Sandbox.create("python-ds", url=limited.url) as sb:
        before = byte_rate(sb, int(4 * limits.bytes_per_s))
        assert before >= 3 * clamped.bytes_per_s, "the policy's own limit must be well above the clamp"
        sb.quarantine("disk clamp test")
        assert byte_rate(sb, int(4 * clamped.bytes_per_s)) <= TOLERANCE * clamped.bytes_per_s
        sb.release()
        after = byte_rate(sb, int(4 * limits.bytes_per_s))
        assert 3 * clamped.bytes_per_s <= after <= TOLERANCE * limits.bytes_per_s
