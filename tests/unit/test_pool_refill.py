"""A pool refill asked for during a request waits for its response to start (pure logic: size-0 pool)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tartarus.daemon.pools import defer, refills_deferred
from tartarus.snapshots.pool import VMMPool


async def _pool() -> VMMPool:
    # Size 0: the refill task never starts a VMM, it only waits to be woken.
    template: Any = SimpleNamespace(name="t")
    return VMMPool(template, template, Path("/nonexistent"), size=0, defer=defer)


def test_refills_inside_the_block_wait_for_its_end() -> None:
    async def scenario() -> None:
        pool = await _pool()
        try:
            with refills_deferred():
                pool.refill()
                pool.refill()  # asked twice: one wake
                assert not pool._wake.is_set()
            assert pool._wake.is_set()
            pool._wake.clear()
            pool.refill()  # outside any block: at once
            assert pool._wake.is_set()
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_a_failing_block_still_refills() -> None:
    async def scenario() -> None:
        pool = await _pool()
        try:
            with pytest.raises(RuntimeError), refills_deferred():
                pool.refill()
                raise RuntimeError("the request failed")
            assert pool._wake.is_set()
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_release_runs_held_refills_and_later_ones_run_at_once() -> None:
    """The daemon releases at the response's start; a task the request left behind (its context
    copied) that refills afterwards must not be held by a block nobody will release again."""

    async def scenario() -> None:
        pool = await _pool()
        try:
            with refills_deferred() as held:
                pool.refill()
                held.release()  # the response started
                assert pool._wake.is_set()
                pool._wake.clear()
                pool.refill()
                assert pool._wake.is_set()
        finally:
            await pool.close()

    asyncio.run(scenario())
