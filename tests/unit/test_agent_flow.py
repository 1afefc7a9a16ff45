"""Flow control in the real guest agent, run on the host in its test mode (`--serve-fd`): it sends a
stream's output only against the host's credit, loses none of it to a slow reader, and stops work the
host detached from. (The VM test in tests/vm/test_streams.py checks the same agent inside a guest.)"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tartarus.bootfiles.initramfs import build_initramfs
from tartarus.runtime.agent import AgentClient, Exit, Output
from tartarus.runtime.flow import FRAME_COST, WINDOW
from tartarus.runtime.protocol import Decoder, F, FieldValue, Frame, T, encode, encode_request

DEADLINE = 20.0  # generous: the machine is shared; every wait below ends as soon as its condition holds
SMALL_WINDOW = 100_000


@pytest.fixture(scope="module")
def agent_binary() -> Path:
    return build_initramfs().parent / "tartarus-agent"


class Raw:
    """The host end of a socketpair served by a real agent process, spoken to frame by frame."""

    def __init__(self, binary: Path) -> None:
        self.sock, guest = socket.socketpair()
        self.proc = subprocess.Popen(
            [str(binary), "--serve-fd", str(guest.fileno())], pass_fds=[guest.fileno()]
        )
        guest.close()
        self.sock.setblocking(False)
        self.decoder = Decoder()
        self.pending: list[Frame] = []

    async def send(self, frame: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, frame)

    async def next(self) -> Frame:
        loop = asyncio.get_running_loop()
        while not self.pending:
            data = await loop.sock_recv(self.sock, 1 << 16)
            assert data, "the agent closed the channel"
            self.pending += [f for f in self.decoder.feed(data) if f.type != T.HELLO]
        return self.pending.pop(0)

    async def barrier(self) -> list[Frame]:
        """PING (id 99) and return every frame that came before its answer: the agent handled all we
        sent before it, and sent all it was going to."""
        await self.send(encode_request(T.PING, 99))
        got: list[Frame] = []
        async with asyncio.timeout(DEADLINE):
            while (frame := await self.next()).id != 99:
                got.append(frame)
        return got

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(timeout=DEADLINE)


def _cost(frames: list[Frame], type_: T) -> int:
    return sum(len(f.payload) + FRAME_COST for f in frames if f.type == type_)


def _used(cost: int, window: int) -> bool:
    """Whether output of that cost used up `window`: the agent stops once a frame would not fit."""
    return window - FRAME_COST <= cost <= window


async def _until_window_used(raw: Raw, type_: T, window: int, got: list[Frame] | None = None) -> list[Frame]:
    """Read frames (onto `got`) until the output in them has used `window` (or the stream ended)."""
    got = [] if got is None else got
    async with asyncio.timeout(DEADLINE):
        while _cost(got, type_) < window - FRAME_COST and not _ended(got):
            got.append(await raw.next())
    return got


def _exec(id_: int, script: str, *extra: tuple[F, FieldValue]) -> bytes:
    return encode_request(T.EXEC, id_, [(F.ARGV, b"sh"), (F.ARGV, b"-c"), (F.ARGV, script.encode()), *extra])


def test_agent_sends_command_output_only_against_credit(agent_binary: Path) -> None:
    async def main() -> None:
        raw = Raw(agent_binary)
        try:
            await raw.send(_exec(1, "head -c 3000000 /dev/zero", (F.WINDOW, SMALL_WINDOW)))
            got = await _until_window_used(raw, T.STDOUT, SMALL_WINDOW)
            got += await raw.barrier()
            assert _used(_cost(got, T.STDOUT), SMALL_WINDOW)  # and not a byte more: the command now waits
            await raw.send(encode_request(T.CREDIT, 1, [(F.SIZE, 1 << 30)]))
            async with asyncio.timeout(DEADLINE):
                while got[-1].type != T.EXIT:
                    got.append(await raw.next())
            assert sum(len(f.payload) for f in got if f.type == T.STDOUT) == 3_000_000
            assert got[-1].fields().get_int(F.EXIT_CODE) == 0
        finally:
            raw.close()

    asyncio.run(main())


def test_agent_reads_a_file_only_against_credit(agent_binary: Path, tmp_path: Path) -> None:
    data = os.urandom(1_500_000)
    (tmp_path / "f").write_bytes(data)

    async def main() -> None:
        raw = Raw(agent_binary)
        try:
            path = str(tmp_path / "f").encode()
            await raw.send(encode_request(T.READ, 1, [(F.PATH, path), (F.WINDOW, SMALL_WINDOW)]))
            granted = SMALL_WINDOW
            got = await _until_window_used(raw, T.DATA, granted)
            while True:
                got += await raw.barrier()
                assert _cost(got, T.DATA) <= granted  # never past the credit
                if _ended(got):
                    break
                assert _used(_cost(got, T.DATA), granted)  # all of it used: waiting for more
                await raw.send(encode_request(T.CREDIT, 1, [(F.SIZE, SMALL_WINDOW)]))
                granted += SMALL_WINDOW
                await _until_window_used(raw, T.DATA, granted, got)
            assert b"".join(f.payload for f in got if f.type == T.DATA) == data
            assert got[-1].fields().get_int(F.SIZE) == len(data)
        finally:
            raw.close()

    asyncio.run(main())


def _ended(frames: list[Frame]) -> bool:
    return any(f.type == T.END for f in frames)


def _open_in(pid: int, path: Path) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    return any(os.readlink(fds / fd) == str(path) for fd in os.listdir(fds) if (fds / fd).exists())


def test_detaching_a_read_closes_the_file_and_ends_its_frames(agent_binary: Path, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(bytes(2_000_000))

    async def main() -> None:
        raw = Raw(agent_binary)
        try:
            path = str(tmp_path / "f").encode()
            await raw.send(encode_request(T.READ, 1, [(F.PATH, path), (F.WINDOW, SMALL_WINDOW)]))
            await _until_window_used(raw, T.DATA, SMALL_WINDOW)
            assert _open_in(raw.proc.pid, tmp_path / "f")
            await raw.send(encode(T.DETACH, 1))
            await raw.send(encode_request(T.CREDIT, 1, [(F.SIZE, 1 << 30)]))  # for an id no longer known
            assert await raw.barrier() == []
            assert not _open_in(raw.proc.pid, tmp_path / "f")
        finally:
            raw.close()

    asyncio.run(main())


def test_a_detached_command_runs_on_with_its_output_dropped(agent_binary: Path, tmp_path: Path) -> None:
    marker = tmp_path / "done"

    async def main() -> None:
        raw = Raw(agent_binary)
        try:
            await raw.send(_exec(1, f"head -c 3000000 /dev/zero; touch {marker}", (F.WINDOW, SMALL_WINDOW)))
            await _until_window_used(raw, T.STDOUT, SMALL_WINDOW)
            assert not marker.exists()  # blocked on its full pipe: nobody gave credit
            await raw.send(encode(T.DETACH, 1))
            async with asyncio.timeout(DEADLINE):  # it finishes (its output drained) and is reaped
                while not marker.exists() or _children(raw.proc.pid):
                    await asyncio.sleep(0.02)
            assert await raw.barrier() == []  # neither output nor EXIT for it
        finally:
            raw.close()

    asyncio.run(main())


def _children(pid: int) -> bool:
    return bool(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


@asynccontextmanager
async def _client(binary: Path) -> AsyncIterator[tuple[AgentClient, subprocess.Popen[bytes]]]:
    host, guest = socket.socketpair()
    proc = subprocess.Popen([str(binary), "--serve-fd", str(guest.fileno())], pass_fds=[guest.fileno()])
    guest.close()
    reader, writer = await asyncio.open_unix_connection(sock=host)
    client = AgentClient(reader, writer)
    try:
        await asyncio.wait_for(client.wait_hello(), DEADLINE)
        yield client, proc
    finally:
        await client.close()
        proc.wait(timeout=DEADLINE)


def test_a_reader_slower_than_the_command_loses_nothing(agent_binary: Path) -> None:
    """The command ends while the rest of its output waits in its pipe for credit, past the agent's
    100 ms drain time: that rest still arrives (closing the pipe then, as for a grandchild's endless
    output, would cut it), and the host never held more than a window."""
    size = WINDOW + 30_000

    async def main() -> None:
        async with _client(agent_binary) as (client, _):
            # A pipe of 1 MiB (F_SETPIPE_SZ): what the window leaves over fits, so the command ends.
            script = f"import fcntl, os; fcntl.fcntl(1, 1031, 1 << 20); os.write(1, b'x' * {size})"
            process = await client.exec([sys.executable, "-c", script])
            async with asyncio.timeout(DEADLINE):
                while Path(f"/proc/{process.pid}").exists():  # reaped by the agent
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # the slow reader: the agent's drain time passes meanwhile
            assert client.queued_bytes <= WINDOW
            out = b""
            async with asyncio.timeout(DEADLINE):
                while not isinstance(event := await process.next_event(), Exit):
                    assert isinstance(event, Output)
                    out += event.data
            assert event.exit_code == 0 and out == b"x" * size

    asyncio.run(main())
