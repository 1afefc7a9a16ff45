"""Apply a sandbox's bandwidth to its running VMM: QEMU block throttling and tc in its namespace
(`Sandbox.contain`, `Sandbox.quarantine` and `Sandbox.release` call these).

Disk: `block_set_io_throttle` on each virtio-blk device, both in one throttle group, so the limit is
the sandbox's total over its read-only root and its writable layer. It acts on the devices' block
backends, not on the block graph, so it changes nothing a snapshot or a restore must agree on and
survives the layer swap of a wake (`MicroVM.replace_drive`). Network: `SandboxNetwork.shape`. A
quarantine changes only the disk side (its network is cut altogether), so it never runs `tc`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from tartarus.limits.bandwidth import Bandwidth
from tartarus.network.sandbox import SandboxNetwork
from tartarus.runtime.qemu import block_device
from tartarus.runtime.vm import MicroVM

THROTTLE_GROUP = "sandbox"


def io_throttle(device: str, bandwidth: Bandwidth) -> dict[str, Any]:
    """`block_set_io_throttle` arguments for one device (0: unlimited)."""
    return {
        "id": device,
        "bps": bandwidth.disk_bytes_per_s or 0,
        "bps_rd": 0,
        "bps_wr": 0,
        "iops": bandwidth.disk_iops or 0,
        "iops_rd": 0,
        "iops_wr": 0,
        "group": THROTTLE_GROUP,
    }


async def throttle_disks(vm: MicroVM | None, bandwidth: Bandwidth) -> None:
    """Set the disk rates (None: unlimited) of a running sandbox's VMM, live: what a quarantine changes."""
    if vm is not None:
        drives = range(len(vm.config.drives))
        await asyncio.gather(
            *(
                vm.qmp_execute("block_set_io_throttle", io_throttle(block_device(i), bandwidth))
                for i in drives
            )
        )


async def apply_bandwidth(vm: MicroVM | None, network: SandboxNetwork | None, bandwidth: Bandwidth) -> None:
    """Give a new VMM (which has no limits) its rates: only the sides, disk or network, that have one."""
    steps: list[Awaitable[None]] = []
    if bandwidth.disk_bytes_per_s is not None or bandwidth.disk_iops is not None:
        steps.append(throttle_disks(vm, bandwidth))
    net = (bandwidth.egress_bytes_per_s, bandwidth.ingress_bytes_per_s)
    if network is not None and net != (None, None):
        steps.append(network.shape(*net))
    await asyncio.gather(*steps)
