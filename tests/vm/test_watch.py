"""Watching a directory in a real VM through the daemon's REST API and the SDK (`files.watch`): the
guest's own changes arrive in order, typed and named, recursively when asked; a watch of what is not a
directory is refused; closing a watch ends it in the guest, so its slots come back. (The agent alone,
with its overflow path: tests/unit/test_agent_watch.py.)"""

from __future__ import annotations

import asyncio
import errno

import pytest

from tartarus.errors import GuestError
from tartarus.sdk import AsyncSandbox, Sandbox, Watcher, WatchEvent
from tests.conftest import wait_until


def _first(watcher: Watcher, n: int) -> list[WatchEvent]:
    got: list[WatchEvent] = []
    for event in watcher:
        got.append(event)
        if len(got) == n:
            break
    return got


def test_the_guests_changes_arrive_in_order_typed_and_named(sandbox: Sandbox) -> None:
    sandbox.commands.run(["mkdir", "-p", "/tmp/watched"])
    with sandbox.files.watch("/tmp/watched") as watcher:  # in place once it returns
        script = "cd /tmp/watched && echo hi > a.txt && chmod 600 a.txt && mv a.txt b.txt && rm b.txt"
        sandbox.commands.run(["sh", "-c", script])
        got = [(e.type, e.name) for e in _first(watcher, 6)]
    assert got == [
        ("create", "a.txt"),
        ("write", "a.txt"),
        ("chmod", "a.txt"),
        ("rename", "a.txt"),  # moved away: the new name comes as a create
        ("create", "b.txt"),
        ("remove", "b.txt"),
    ]


def _opens(sandbox: Sandbox, path: str) -> bool:
    """Whether a watch can be opened now (False while every slot is taken)."""
    try:
        sandbox.files.watch(path).close()
    except GuestError as e:
        assert e.errno == errno.EMFILE, e
        return False
    return True


def test_a_recursive_watch_sees_below_and_closing_frees_the_slot(sandbox: Sandbox) -> None:
    sandbox.commands.run(["mkdir", "-p", "/tmp/deep/old"])
    watchers = [sandbox.files.watch("/tmp/deep") for _ in range(15)]  # the agent allows 16 at once
    with sandbox.files.watch("/tmp/deep", recursive=True) as deep:
        with pytest.raises(GuestError) as full:
            sandbox.files.watch("/tmp/deep")
        assert full.value.errno == errno.EMFILE
        sandbox.commands.run(["sh", "-c", "echo x > /tmp/deep/old/c && mkdir /tmp/deep/new"])
        got = [(e.type, e.name, e.is_dir) for e in _first(deep, 3)]
    assert got == [("create", "old/c", False), ("write", "old/c", False), ("create", "new", True)]
    for w in watchers:
        w.close()
    # The slots come back once the daemon has seen each stream end and cancelled its watch in the guest:
    # after `close` returns, not before it.
    assert wait_until(lambda: _opens(sandbox, "/tmp/deep"), 10), "closed watches never freed their slots"
    with pytest.raises(GuestError) as refused:
        sandbox.files.watch("/etc/passwd")
    assert refused.value.errno == errno.ENOTDIR


def test_the_async_sdk_watches_too(daemon_url: str, sandbox: Sandbox) -> None:
    async def main() -> list[tuple[str, str]]:
        sb = await AsyncSandbox.connect(sandbox.id, url=daemon_url)
        try:
            async with await sb.files.watch("/tmp") as watcher:
                await sb.commands.run(["mkdir", "/tmp/async-made"])
                async for event in watcher:
                    return [(event.type, event.name)]
            return []
        finally:
            await sb._client.close()

    assert asyncio.run(main()) == [("create", "async-made")]
