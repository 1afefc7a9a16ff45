"""TTL timers: closing them never cuts short a sandbox's expiry that has begun."""

from __future__ import annotations

import asyncio

from tartarus.limits.ttl import Deadlines


def test_close_waits_for_expiries_in_progress_and_cancels_the_rest() -> None:
    done: list[str] = []

    async def main() -> None:
        deadlines = Deadlines()
        started = asyncio.Event()

        async def slow_expiry() -> None:  # a destroy: VMM, network, cgroup, files
            started.set()
            await asyncio.sleep(0.2)
            done.append("expired")

        async def never() -> None:
            done.append("fired too early")

        deadlines.schedule("a", 0, slow_expiry)
        deadlines.schedule("b", 3600, never)
        await started.wait()
        await deadlines.close()
        assert done == ["expired"]

    asyncio.run(main())
    assert done == ["expired"]
