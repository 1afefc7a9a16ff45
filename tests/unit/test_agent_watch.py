"""Directory watches and resizing a terminal by pid (protocol version 5), in the real guest agent run on
the host in its test mode (`--serve-fd`): inotify events arrive in order with their paths, a recursive
watch follows directories made later, a watch without credit drops events and says so with an
overflow event, and PRESIZE reaches a background command's terminal. (tests/vm/test_watch.py drives
the same through the daemon's API inside a guest.)"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from tartarus.bootfiles.initramfs import build_initramfs
from tartarus.errors import GuestError
from tartarus.runtime.agent import PtySize, Watch, WatchEvent
from tartarus.runtime.protocol import FLAG_RECURSIVE, F, FieldValue, T, encode_request
from tests.unit.test_agent_flow import DEADLINE, Raw, _client
from tests.unit.test_agent_processes import _output_until

IN_MODIFY, IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x4, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_Q_OVERFLOW, IN_ISDIR = 0x100, 0x200, 0x4000, 0x40000000


@pytest.fixture(scope="module")
def agent_binary() -> Path:
    return build_initramfs().parent / "tartarus-agent"


async def _events(watch: Watch, n: int) -> list[WatchEvent]:
    got: list[WatchEvent] = []
    async with asyncio.timeout(DEADLINE):
        while len(got) < n:
            event = await watch.next_event()
            assert event is not None, got
            got.append(event)
    return got


def test_changes_arrive_in_order_with_their_names(agent_binary: Path, tmp_path: Path) -> None:
    async def main() -> None:
        async with _client(agent_binary) as (client, _):
            watch = await client.watch(str(tmp_path))
            (tmp_path / "a.txt").write_bytes(b"x")
            os.chmod(tmp_path / "a.txt", 0o600)
            os.rename(tmp_path / "a.txt", tmp_path / "b.txt")
            (tmp_path / "b.txt").unlink()
            got = [(e.mask & ~IN_ISDIR, e.name) for e in await _events(watch, 6)]
            assert got == [
                (IN_CREATE, "a.txt"),
                (IN_MODIFY, "a.txt"),
                (IN_ATTRIB, "a.txt"),
                (IN_MOVED_FROM, "a.txt"),
                (IN_MOVED_TO, "b.txt"),
                (IN_DELETE, "b.txt"),
            ]
            watch.close()

    asyncio.run(main())


def test_a_recursive_watch_follows_directories_made_later(agent_binary: Path, tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()

    async def main() -> None:
        async with _client(agent_binary) as (client, _):
            plain = await client.watch(str(tmp_path))
            deep = await client.watch(str(tmp_path), recursive=True)
            (tmp_path / "old" / "f").write_bytes(b"")
            (tmp_path / "new").mkdir()
            await asyncio.sleep(0.2)  # the agent adds its watch on `new` when it reads the IN_CREATE
            (tmp_path / "new" / "g").write_bytes(b"")
            names = [e.name for e in await _events(deep, 3)]
            assert names == ["old/f", "new", "new/g"]
            assert [e.name for e in await _events(plain, 1)] == ["new"]  # nothing below it
            plain.close()
            deep.close()

    asyncio.run(main())


def test_watching_what_is_not_a_directory_is_refused(agent_binary: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")

    async def main() -> None:
        async with _client(agent_binary) as (client, _):
            for path, code in ((tmp_path / "file", errno.ENOTDIR), (tmp_path / "none", errno.ENOENT)):
                with pytest.raises(GuestError) as caught:
                    await client.watch(str(path))
                assert caught.value.errno == code
            watches = [await client.watch(str(tmp_path)) for _ in range(16)]
            with pytest.raises(GuestError) as caught:
                await client.watch(str(tmp_path))
            assert caught.value.errno == errno.EMFILE
            for w in watches:
                w.close()
            (await client.watch(str(tmp_path))).close()  # closed watches free their slots

    asyncio.run(main())


def test_a_watch_without_credit_drops_events_and_says_so(agent_binary: Path, tmp_path: Path) -> None:
    """Events wait in the kernel's queue while the watch has no credit; a grant just over the agent's
    reading threshold (16 KiB) lets it read a batch of more events than that credit covers: the rest are
    dropped, not queued by the agent or the host, and an overflow event (IN_Q_OVERFLOW, an empty name)
    says so."""

    async def main() -> None:
        raw = Raw(agent_binary)
        try:
            items: list[tuple[F, FieldValue]] = [
                (F.PATH, str(tmp_path).encode()),
                (F.FLAGS, 0),
                (F.WINDOW, 300),
            ]
            await raw.send(encode_request(T.WATCH, 7, items))
            assert (await raw.next()).type == T.OK
            for i in range(200):
                (tmp_path / f"f{i:03}").write_bytes(b"")
            assert [f for f in await raw.barrier() if f.id == 7] == []  # no credit: nothing read
            await raw.send(encode_request(T.CREDIT, 7, [(F.SIZE, 16 << 10)]))
            got = [f for f in await raw.barrier() if f.id == 7]
            await raw.send(encode_request(T.CREDIT, 7, [(F.SIZE, 1 << 16)]))
            async with asyncio.timeout(DEADLINE):
                while not got or got[-1].fields().get_int(F.TYPE) != IN_Q_OVERFLOW:
                    got.append(await raw.next())
            names = [f.fields().get_str(F.NAME) for f in got[:-1]]
            assert 0 < len(names) < 128 and names == [f"f{i:03}" for i in range(len(names))]
            assert got[-1].type == T.EVENT and got[-1].fields().get_str(F.NAME) == ""
            await raw.send(encode_request(T.WATCH, 8, [(F.PATH, b"/"), (F.FLAGS, FLAG_RECURSIVE << 3)]))
            async with asyncio.timeout(DEADLINE):
                while (answer := await raw.next()).id != 8:  # watch 7 goes on meanwhile
                    pass
            assert answer.type == T.ERROR  # unknown FLAGS bits
        finally:
            raw.close()

    asyncio.run(main())


def test_the_end_of_the_watched_directory_ends_the_watch(agent_binary: Path, tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()

    async def main() -> None:
        async with _client(agent_binary) as (client, _):
            watch = await client.watch(str(gone))
            gone.rmdir()
            async with asyncio.timeout(DEADLINE):
                while (event := await watch.next_event()) is not None:
                    assert event.name == ""  # IN_DELETE_SELF of the directory itself
            assert watch.ended

    asyncio.run(main())


def test_a_background_terminal_is_resized_by_pid(agent_binary: Path) -> None:
    async def main() -> None:
        async with _client(agent_binary) as (client, _):
            shell = await client.exec(["sh"], pty=PtySize(24, 80), keep=True)
            await client.resize_pid(shell.pid, PtySize(40, 132))
            await client.send_input(shell.pid, b"stty size\n")
            await _output_until(shell, b"40 132")
            plain = await client.exec(["sleep", "30"], keep=True)
            with pytest.raises(GuestError) as caught:
                await client.resize_pid(plain.pid, PtySize(40, 132))
            assert caught.value.errno == errno.ENOTTY
            for process in (shell, plain):
                await client.signal_pid(process.pid, 9)

    asyncio.run(main())
