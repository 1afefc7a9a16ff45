"""Running commands addressed by pid (protocol version 4), in the real guest agent run on the host in its
test mode (`--serve-fd`): a kept command outlives its request, is listed, reattached, written to, closed
and signalled by pid; a hostile or mistaken frame gets a clear ERROR. (tests/vm/test_processes.py
drives the same through the daemon's API inside a guest.)"""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
from pathlib import Path

import pytest

from tartarus.bootfiles.initramfs import build_initramfs
from tartarus.errors import GuestError, SandboxFailed
from tartarus.runtime.agent import MAX_PROCS, RESERVED_IDS, AgentClient, Exit, Output, Process
from tartarus.runtime.protocol import (
    FLAG_KEEP,
    HEADER,
    INPUT_MAX,
    VERSION,
    F,
    Fields,
    Frame,
    T,
    encode_fields,
    encode_request,
)
from tests.unit.test_agent_flow import DEADLINE, Raw, _client


@pytest.fixture(scope="module")
def agent_binary() -> Path:
    return build_initramfs().parent / "tartarus-agent"


async def _output_until(process: Process, want: bytes) -> bytes:
    got = b""
    async with asyncio.timeout(DEADLINE):
        while want not in got:
            event = await process.next_event()
            assert isinstance(event, Output), event
            got += event.data
    return got


async def _exit(process: Process) -> Exit:
    async with asyncio.timeout(DEADLINE):
        while True:
            event = await process.next_event()
            if isinstance(event, Exit):
                return event


def test_a_kept_command_is_listed_reattached_fed_and_closed_by_pid(agent_binary: Path) -> None:
    async def main() -> None:
        async with _client(agent_binary) as (client, _):
            started = await client.exec(["cat"], stdin=True, keep=True, cwd="/tmp")
            assert started.keep
            started.abandon()  # the starter leaves: a kept command runs on
            (listed,) = [p for p in await client.processes() if p.pid == started.pid]
            assert listed.argv == ("cat",) and listed.cwd == "/tmp"
            assert listed.keep and listed.stdin and not listed.attached and not listed.pty
            attached = await client.attach(started.pid)
            assert attached.keep and attached.pid == started.pid
            assert (await client.processes())[0].attached
            await client.send_input(started.pid, b"echo me\n")
            assert await _output_until(attached, b"echo me\n") == b"echo me\n"
            await client.send_input(started.pid, b"", close=True)  # cat sees end of input and exits
            assert await _exit(attached) == Exit(exit_code=0, signal=None, timed_out=False)
            assert started.pid not in [p.pid for p in await client.processes()]

    asyncio.run(main())


def test_a_signal_by_pid_reaches_the_command(agent_binary: Path) -> None:
    async def main() -> None:
        async with _client(agent_binary) as (client, _):
            sleeper = await client.exec(["sleep", "60"])
            await client.signal_pid(sleeper.pid, signal.SIGTERM)
            assert await _exit(sleeper) == Exit(exit_code=None, signal=signal.SIGTERM, timed_out=False)

    asyncio.run(main())


def test_attaching_takes_the_stream_from_its_listener(agent_binary: Path) -> None:
    """One listener per command: the starter's stream ends with EBUSY, the attacher gets the rest."""

    async def main() -> None:
        async with _client(agent_binary) as (client, _):
            starter = await client.exec(["cat"], stdin=True, keep=True)
            attached = await client.attach(starter.pid)
            with pytest.raises(GuestError) as refused:
                await asyncio.wait_for(starter.next_event(), DEADLINE)
            assert refused.value.errno == errno.EBUSY
            await client.send_input(starter.pid, b"x", close=True)
            assert await _output_until(attached, b"x") == b"x"
            assert (await _exit(attached)).exit_code == 0

    asyncio.run(main())


def test_unknown_closed_and_reserved_commands_are_refused(agent_binary: Path) -> None:
    async def main() -> None:
        async with _client(agent_binary) as (client, _):
            own = await client.exec(["sleep", "60"], request_id=RESERVED_IDS + 7)  # the sandbox's own
            no_stdin = await client.exec(["sleep", "60"])
            for pid in (own.pid, 0, -1, 1 << 40):
                for call in (client.attach(pid), client.send_input(pid, b"x"), client.signal_pid(pid, 9)):
                    with pytest.raises(GuestError) as refused:
                        await call
                    assert refused.value.errno == errno.ESRCH, pid
            assert [p.pid for p in await client.processes()] == [no_stdin.pid]
            with pytest.raises(GuestError) as closed:
                await client.send_input(no_stdin.pid, b"x")
            assert closed.value.errno == errno.EPIPE
            with pytest.raises(GuestError) as bad:
                await client.signal_pid(no_stdin.pid, 65)
            assert bad.value.errno == errno.EINVAL
            await client.signal_pid(no_stdin.pid, signal.SIGKILL)
            assert (await _exit(no_stdin)).signal == signal.SIGKILL

    asyncio.run(main())


def test_hostile_frames_get_errors_not_crashes(agent_binary: Path) -> None:
    """Oversized input, unknown flag bits and a missing pid are refused; the agent serves on."""

    async def main() -> None:
        raw = Raw(agent_binary)
        try:
            await raw.send(
                encode_request(T.EXEC, 1, [(F.ARGV, b"cat"), (F.STDIN, 1), (F.FLAGS, FLAG_KEEP | 1)])
            )
            await raw.send(encode_request(T.EXEC, 2, [(F.ARGV, b"cat"), (F.STDIN, 1), (F.FLAGS, FLAG_KEEP)]))
            await raw.send(encode_request(T.INPUT, 3, [(F.PID, 1), (F.INPUT, b"\0" * (INPUT_MAX + 1))]))
            await raw.send(encode_request(T.INPUT, 4, [(F.INPUT, b"x")]))
            await raw.send(encode_request(T.ATTACH, 5, [(F.PID, 1), (F.WINDOW, 10)]))
            await raw.send(encode_request(T.ATTACH, 2, [(F.PID, 1)]))  # an id in flight
            got: dict[int, list[Frame]] = {}
            for frame in await raw.barrier():
                got.setdefault(frame.id, []).append(frame)

            def errno_of(id_: int) -> int | None:
                (frame,) = got[id_]
                assert frame.type == T.ERROR, frame
                return frame.fields().get_int(F.ERRNO)

            assert errno_of(1) == errno.EINVAL  # an unknown flag bit
            started, busy = got[2]
            assert started.type == T.STARTED and busy.fields().get_int(F.ERRNO) == errno.EBUSY
            assert errno_of(3) == errno.ENAMETOOLONG  # INPUT over INPUT_MAX
            assert errno_of(4) == errno.EINVAL  # no PID
            assert errno_of(5) == errno.EINVAL  # a window too small
            pid = started.fields().get_int(F.PID) or 0
            await raw.send(encode_request(T.INPUT, 7, [(F.PID, pid), (F.INPUT, b"a\0b"), (F.FLAGS, 1)]))
            frames: list[Frame] = []
            async with asyncio.timeout(DEADLINE):
                while not any(f.type == T.EXIT for f in frames):
                    frames.append(await raw.next())
            assert [f.type for f in frames if f.id == 7] == [T.OK]
            assert b"".join(f.payload for f in frames if f.type == T.STDOUT) == b"a\0b"
        finally:
            raw.close()

    asyncio.run(main())


def test_proc_frames_round_trip() -> None:
    """The host decodes what PROCS sends, argv bytes that are not UTF-8 included."""
    payload = encode_fields(
        [(F.PID, 42), (F.ARGV, b"sh"), (F.ARGV, b"-c"), (F.ARGV, b"\xff"), (F.CWD, b"/w")]
    )
    fields = Fields.decode(payload)
    assert fields.get_int(F.PID) == 42
    assert fields.get_all(F.ARGV) == [b"sh", b"-c", b"\xff"]
    assert encode_fields([(F.INPUT, b"\0")]) == b"\x20\x00\x00\x00\x01\x00"
    with pytest.raises(ValueError):
        encode_fields([(F.ARGV, b"a\0")])


def test_a_guest_listing_more_commands_than_it_can_run_fails_the_call() -> None:
    """A hostile agent answering PROCS without end cannot grow the host's list without bound."""

    async def main() -> str:
        host, guest = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=host)
        client = AgentClient(reader, writer)
        client.assume_running()
        client._version = VERSION
        guest.setblocking(False)
        loop = asyncio.get_running_loop()
        listing = asyncio.create_task(client.processes())
        try:
            frames: list[Frame] = []
            while not frames:
                frames = _requests(await loop.sock_recv(guest, 1 << 16))
            proc = encode_request(T.PROC, frames[0].id, [(F.PID, 7), (F.ARGV, b"x")])
            for _ in range(MAX_PROCS + 1):
                await loop.sock_sendall(guest, proc)
            with pytest.raises(SandboxFailed) as failed:
                await asyncio.wait_for(listing, DEADLINE)
            return str(failed.value)
        finally:
            await client.close()
            guest.close()

    assert "more than 256" in asyncio.run(main())


def _requests(data: bytes) -> list[Frame]:
    """Host frames, decoded by hand: the host's Decoder accepts only guest frame types."""
    frames = []
    buf = data
    while len(buf) >= HEADER.size:
        length, id_, type_, _, _ = HEADER.unpack_from(buf)
        frames.append(Frame(T(type_), id_, buf[HEADER.size : HEADER.size + length]))
        buf = buf[HEADER.size + length :]
    return frames
