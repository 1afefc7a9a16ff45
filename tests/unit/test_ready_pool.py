"""The ready pool's pure logic: its size setting, the memory bound, and refills waiting for creates."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tartarus.daemon.config import ReadySizes
from tartarus.daemon.pools import Starts
from tartarus.errors import InvalidArgument
from tartarus.snapshots.ready import memory_allows


def test_ready_pool_sizes_parse() -> None:
    assert ReadySizes.parse("0") == ReadySizes()
    sizes = ReadySizes.parse("2, python-ds=4,base=0")
    assert (sizes.of("python-ds"), sizes.of("base"), sizes.of("other")) == (4, 0, 2)
    assert ReadySizes.parse("python-ds=1").of("other") == 0
    for bad in ("-1", "x", "python-ds=", "=3", "python-ds=99"):
        with pytest.raises(InvalidArgument, match="TARTARUS_READY_POOL"):
            ReadySizes.parse(bad)


def test_memory_bound(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       4096000 kB\nMemFree:  10 kB\nMemAvailable:   2048000 kB\n")
    assert memory_allows(512, meminfo)  # 2 GB available - 0.5 GiB >= 25 % of 4 GB
    assert not memory_allows(1500, meminfo)


def test_refills_wait_until_no_create_is_in_progress() -> None:
    async def scenario() -> list[str]:
        starts = Starts(settle_s=0)
        seen: list[str] = []

        async def refill() -> None:
            await starts.quiet()
            seen.append("refill")

        with starts.starting():
            with starts.starting():
                task = asyncio.create_task(refill())
                await asyncio.sleep(0)
                seen.append("first done")
            await asyncio.sleep(0)
            seen.append("second done")
        await task
        await starts.quiet()  # quiet now: returns at once
        return seen

    assert asyncio.run(scenario()) == ["first done", "second done", "refill"]


def test_refills_wait_for_the_settle_time_after_the_last_create() -> None:
    async def scenario() -> float:
        starts = Starts(settle_s=0.05)
        with starts.starting():
            pass
        ended = time.monotonic()
        await starts.quiet()
        return time.monotonic() - ended

    assert asyncio.run(scenario()) >= 0.05
