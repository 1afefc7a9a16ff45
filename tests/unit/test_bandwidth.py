"""Bandwidth limits as data: the policy section, what admission gives a sandbox, the quarantine clamp,
and the tc and QMP text that apply them (real VMs: tests/limits/test_bandwidth.py, tests/network/)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tartarus.errors import InvalidArgument
from tartarus.limits.bandwidth import Bandwidth
from tartarus.network.policy import NetworkPolicy
from tartarus.network.tc import shaping
from tartarus.policy import PolicyEngine, load_policy
from tartarus.policy.admission import admit
from tartarus.policy.model import BandwidthPolicy, Policy
from tartarus.sandbox.spec import SandboxSpec
from tartarus.sandbox.throttle import io_throttle
from tartarus.templates.built import Template


def test_tc_shapes_egress_on_the_uplink_and_ingress_on_the_tap() -> None:
    assert shaping(1_000_000, 5 << 20).splitlines() == [
        "qdisc replace dev up0 root tbf rate 8000000bit burst 100000 latency 50ms",
        f"qdisc replace dev tap0 root tbf rate {(5 << 20) * 8}bit burst {(5 << 20) // 10} latency 50ms",
    ]
    # A low rate still lets a whole GSO packet through; an unlimited direction gets a plain FIFO back.
    assert shaping(100_000, None).splitlines() == [
        "qdisc replace dev up0 root tbf rate 800000bit burst 65536 latency 50ms",
        "qdisc replace dev tap0 root pfifo limit 1000",
    ]
    with pytest.raises(ValueError, match="positive"):
        shaping(0, None)


def test_disk_throttle_covers_both_drives_in_one_group_and_zero_lifts_it() -> None:
    on = io_throttle("vd1", Bandwidth(disk_bytes_per_s=4 << 20, disk_iops=50))
    assert (on["id"], on["bps"], on["iops"], on["group"]) == ("vd1", 4 << 20, 50, "sandbox")
    assert on["bps_rd"] == on["bps_wr"] == on["iops_rd"] == on["iops_wr"] == 0
    off = io_throttle("vd0", Bandwidth(egress_bytes_per_s=1 << 20))
    assert (off["bps"], off["iops"], off["group"]) == (0, 0, "sandbox")


def test_a_clamp_only_lowers() -> None:
    own = Bandwidth(disk_bytes_per_s=10 << 20, disk_iops=None, egress_bytes_per_s=1 << 20)
    clamp = Bandwidth(disk_bytes_per_s=20 << 20, disk_iops=100)
    assert own.tightened(clamp) == Bandwidth(10 << 20, 100, 1 << 20, None)
    assert not Bandwidth().limited and own.limited
    assert Bandwidth().tightened(Bandwidth()) == Bandwidth()


def test_admission_gives_every_sandbox_the_policys_bandwidth() -> None:
    template = Template("python-ds", "k", Path("/nonexistent"), "ext4", vcpus=1, memory_mib=512)
    req = SandboxSpec("python-ds", tenant="t", network=NetworkPolicy())
    default = asyncio.run(admit(PolicyEngine(Policy()), template, req))
    assert not default.limits.bandwidth.limited  # off unless the policy file sets it
    section = BandwidthPolicy(disk_bytes_per_s=50 << 20, disk_iops=1000, ingress_bytes_per_s=1 << 20)
    limited = asyncio.run(admit(PolicyEngine(Policy(bandwidth=section)), template, req))
    assert limited.limits.bandwidth == Bandwidth(50 << 20, 1000, None, 1 << 20)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("bandwidth: {disk_bytes_per_s: 1000}", "bandwidth.disk_bytes_per_s"),
        ("bandwidth: {disk_iops: 0}", "bandwidth.disk_iops"),
        ("bandwidth: {egress_mbit: 100}", "bandwidth.egress_mbit"),
        ("quarantine: {disk_bytes_per_s: -1}", "quarantine.disk_bytes_per_s"),
    ],
)
def test_bad_bandwidth_settings_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=field.replace(".", r"\.")):
        load_policy(path)
