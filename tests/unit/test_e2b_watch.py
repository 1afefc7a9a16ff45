"""Directory watches, the pure parts: inotify masks named as E2B names changes (routes/watch.py), those
names as envd's FilesystemEvents (e2b/watchers.py), a polled watcher's bounded queue with its overflow
marker, the per-sandbox bound, and the SDK's typed events. The same on real sandboxes:
tests/vm/test_watch.py and tests/e2b_compat/test_sdk.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from tartarus.daemon.routes.watch import Shown, event_type
from tartarus.e2b import watchers
from tartarus.e2b.connect import ConnectError
from tartarus.e2b.upstream import WatchChange
from tartarus.errors import GuestError, SandboxFailed
from tartarus.sdk import WatchEvent
from tartarus.sdk._core import watch_event

IN_ISDIR = 0x40000000


@pytest.mark.parametrize(
    ("mask", "name"),
    [
        (0x100, "create"),  # IN_CREATE
        (0x100 | IN_ISDIR, "create"),
        (0x80, "create"),  # IN_MOVED_TO: a name appears
        (0x2, "write"),  # IN_MODIFY
        (0x200, "remove"),  # IN_DELETE
        (0x400, "remove"),  # IN_DELETE_SELF
        (0x40, "rename"),  # IN_MOVED_FROM: a name goes away
        (0x800, "rename"),  # IN_MOVE_SELF
        (0x4, "chmod"),  # IN_ATTRIB
        (0x4000, "overflow"),  # IN_Q_OVERFLOW
        (0x8000, None),  # IN_IGNORED: not a change
        (0x8, None),  # IN_CLOSE_WRITE: not asked for, never named
    ],
)
def test_inotify_masks_are_named_as_e2b_names_changes(mask: int, name: str | None) -> None:
    assert event_type(mask) == name


def test_a_file_written_through_the_api_shows_under_its_own_name() -> None:
    """The agent writes a temporary file in the directory and renames it over the file: clients see the
    file created and written under its own name, and nothing of the temporary one."""
    shown = Shown()
    temp = "d/.tartarus-write-a1B2c3"
    assert shown(0x100, temp) == []  # IN_CREATE
    assert shown(0x4, temp) == []  # IN_ATTRIB (its mode)
    assert shown(0x2, temp) == []  # IN_MODIFY
    assert shown(0x40, temp) == []  # IN_MOVED_FROM
    assert shown(0x80, "d/f.txt") == [("create", "d/f.txt"), ("write", "d/f.txt")]  # IN_MOVED_TO
    assert shown(0x80, "d/g.txt") == [("create", "d/g.txt")]  # a plain move in: only created
    assert shown(0x40, "f.tartarus-write-a1B2c3") == [
        ("rename", "f.tartarus-write-a1B2c3")
    ]  # not the agent's


def test_changes_become_envds_filesystem_events() -> None:
    assert watchers.fs_event(WatchChange("create", "a/b.txt")) == {
        "name": "a/b.txt",
        "type": "EVENT_TYPE_CREATE",
    }
    assert watchers.fs_event(WatchChange("chmod", "x"))["type"] == "EVENT_TYPE_CHMOD"  # type: ignore[index]
    assert watchers.fs_event(WatchChange("overflow")) == {"name": "", "type": "EVENT_TYPE_UNSPECIFIED"}
    assert watchers.fs_event(WatchChange("started")) is None
    error = watchers.watch_error(WatchChange("error", code="sandbox_failed", message="VM died"))
    assert isinstance(error, ConnectError) and error.code == "unavailable"
    assert watchers.watch_error(WatchChange("write", "f")) is None


def test_a_polled_watcher_keeps_a_bounded_queue_and_marks_what_it_dropped() -> None:
    async def nothing() -> AsyncGenerator[WatchChange, None]:
        return
        yield

    w = watchers.Watcher("sb", nothing())
    for n in range(watchers.MAX_QUEUED + 10):
        w.keep({"name": str(n), "type": "EVENT_TYPE_WRITE"})
    taken = w.take()
    assert len(taken) == watchers.MAX_QUEUED + 1  # the rest dropped, not queued
    assert taken[-1] == {"name": "", "type": "EVENT_TYPE_UNSPECIFIED"}  # and said so
    assert [e["name"] for e in taken[:3]] == ["0", "1", "2"]
    assert w.take() == []
    w.keep({"name": "late", "type": "EVENT_TYPE_CREATE"})
    assert w.take() == [{"name": "late", "type": "EVENT_TYPE_CREATE"}]


def test_watchers_are_bounded_per_sandbox_polled_and_removed() -> None:
    closed: list[int] = []

    def stream(n: int, *changes: WatchChange) -> AsyncGenerator[WatchChange, None]:
        async def gen() -> AsyncGenerator[WatchChange, None]:
            try:
                yield WatchChange("started")
                for change in changes:
                    yield change
                await asyncio.Event().wait()  # a watch runs until stopped
            finally:
                closed.append(n)

        return gen()

    async def main() -> None:
        registry = watchers.Watchers()
        first = await registry.create("sb", stream(0, WatchChange("create", "f"), WatchChange("write", "f")))
        await asyncio.sleep(0)  # the follower takes what came
        await asyncio.sleep(0)
        assert [e["type"] for e in registry.events("sb", first)] == ["EVENT_TYPE_CREATE", "EVENT_TYPE_WRITE"]
        with pytest.raises(ConnectError) as other:
            registry.events("sb-other", first)  # another sandbox's watcher is not found
        assert other.value.code == "not_found"
        ids = [await registry.create("sb", stream(n)) for n in range(1, watchers.MAX_WATCHERS)]
        with pytest.raises(ConnectError) as full:
            await registry.create("sb", stream(99))
        assert full.value.code == "resource_exhausted"
        await registry.create("sb-2", stream(100))  # the bound is per sandbox
        await registry.remove("sb", first)
        assert 0 in closed
        with pytest.raises(ConnectError):
            registry.events("sb", first)
        await registry.close()
        assert (
            set(closed) >= {*range(1, watchers.MAX_WATCHERS), 100} and len(ids) == watchers.MAX_WATCHERS - 1
        )

    asyncio.run(main())


def test_a_watch_that_fails_is_reported_on_the_next_poll() -> None:
    async def failing() -> AsyncGenerator[WatchChange, None]:
        yield WatchChange("started")
        yield WatchChange("error", code="sandbox_failed", message="the VM died")

    async def main() -> None:
        registry = watchers.Watchers()
        watcher_id = await registry.create("sb", failing())
        for _ in range(3):
            await asyncio.sleep(0)
        with pytest.raises(ConnectError) as caught:
            registry.events("sb", watcher_id)
        assert caught.value.code == "unavailable"
        with pytest.raises(ConnectError) as gone:
            registry.events("sb", watcher_id)  # reported once, then forgotten
        assert gone.value.code == "not_found"

    asyncio.run(main())


def test_the_sdk_types_watch_lines() -> None:
    assert watch_event(b'{"type":"started"}') is None
    assert watch_event(b'{"type":"create","name":"d","is_dir":true}') == WatchEvent("create", "d", True)
    assert watch_event('{"type":"overflow"}') == WatchEvent("overflow", "", False)
    with pytest.raises(SandboxFailed):
        watch_event(b'{"type":"error","code":"sandbox_failed","message":"VM died"}')
    with pytest.raises(GuestError) as caught:
        watch_event(b'{"type":"error","code":"guest_error","message":"gone","errno":2}')
    assert caught.value.errno == 2
