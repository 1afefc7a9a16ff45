"""PTY exec against the real guest agent, run on the host in its test mode (`--serve-fd`).

The agent is the same binary the initramfs carries (built from agent/ and cached by its source hash);
the commands run on this host, which is enough to check the terminal handling without booting a VM.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tartarus.bootfiles.initramfs import build_initramfs
from tartarus.errors import Conflict, GuestError, InvalidArgument
from tartarus.runtime.agent import AgentClient, Exit, Output, Process, PtySize
from tartarus.runtime.protocol import (
    HEADER,
    VERSION,
    Decoder,
    F,
    FieldValue,
    Frame,
    T,
    encode,
    encode_fields,
    encode_request,
)

DEADLINE = 20.0  # generous: the machine is shared; every wait below ends as soon as its condition holds


@pytest.fixture(scope="module")
def agent_binary() -> Path:
    return build_initramfs().parent / "tartarus-agent"


def _spawn(binary: Path) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """An agent serving one end of a socketpair; the other (non-blocking) end is returned."""
    host, guest = socket.socketpair()
    proc = subprocess.Popen([str(binary), "--serve-fd", str(guest.fileno())], pass_fds=[guest.fileno()])
    guest.close()
    host.setblocking(False)
    return host, proc


@asynccontextmanager
async def serving(binary: Path) -> AsyncIterator[AgentClient]:
    """A client connected to a fresh agent process; the agent exits (killing its commands) on close."""
    host, proc = _spawn(binary)
    reader, writer = await asyncio.open_unix_connection(sock=host)
    client = AgentClient(reader, writer)
    try:
        await asyncio.wait_for(client.wait_hello(), DEADLINE)
        yield client
    finally:
        await client.close()
        try:
            proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise


def run(binary: Path, test: Callable[[AgentClient], Awaitable[None]]) -> None:
    async def main() -> None:
        async with serving(binary) as client:
            await test(client)

    asyncio.run(main())


class Terminal:
    """Collects a PTY exec's output so a test can wait for what a user would see."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.output = b""

    async def expect(self, pattern: bytes) -> re.Match[bytes]:
        """Read output until `pattern` matches it (raises on exit or timeout)."""
        async with asyncio.timeout(DEADLINE):
            while (match := re.search(pattern, self.output)) is None:
                event = await self.process.next_event()
                if isinstance(event, Exit):
                    raise AssertionError(f"exited ({event}) before {pattern!r}; output: {self.output!r}")
                assert event.stream == "stdout"  # a terminal merges stderr into it
                self.output += event.data
        return match

    async def wait(self) -> Exit:
        async with asyncio.timeout(DEADLINE):
            while True:
                event = await self.process.next_event()
                if isinstance(event, Exit):
                    return event
                assert isinstance(event, Output)
                self.output += event.data


def test_command_sees_a_terminal_of_the_requested_size(agent_binary: Path) -> None:
    async def test(client: AgentClient) -> None:
        process = await client.exec(["sh", "-c", "tty; stty size; echo $TERM"], pty=PtySize(31, 97))
        term = Terminal(process)
        exit_ = await term.wait()
        assert exit_.exit_code == 0
        assert re.search(rb"^/dev/pts/\d+\r\n31 97\r\nxterm-256color\r\n", term.output), term.output

    run(agent_binary, test)


def test_env_term_wins_and_resize_reaches_the_command(agent_binary: Path) -> None:
    async def test(client: AgentClient) -> None:
        script = "echo term=$TERM; trap 'echo winch' WINCH; echo ready; read line; stty size; echo got=$line"
        process = await client.exec(["bash", "-c", script], env={"TERM": "vt100"}, pty=PtySize(24, 80))
        term = Terminal(process)
        await term.expect(rb"term=vt100\r\nready\r\n")
        await process.resize(50, 132)
        await process.write_stdin(b"hello\n")
        # The new size is what stty reads, and SIGWINCH arrived (bash runs the trap when `read` returns,
        # or before it if the signal came first).
        await term.expect(rb"50 132\r\ngot=hello\r\n")
        assert b"winch\r\n" in term.output
        assert (await term.wait()).exit_code == 0

    run(agent_binary, test)


def test_ctrl_c_interrupts_the_foreground_job_and_the_shell_goes_on(agent_binary: Path) -> None:
    async def test(client: AgentClient) -> None:
        process = await client.exec(["sh", "-i"], env={"PS1": "$ "}, pty=PtySize(24, 80))
        term = Terminal(process)
        # The job prints once it runs in the foreground (the typed line echoes "$((1+2))", not 3).
        await process.write_stdin(b"sh -c 'echo start-$((1+2)); exec sleep 100'\n")
        await term.expect(rb"start-3")
        await process.write_stdin(b"\x03")
        await process.write_stdin(b"echo after-$((6*7))\n")
        await term.expect(rb"after-42")  # long before the 100 s sleep could have ended
        await process.write_stdin(b"exit 3\n")
        assert (await term.wait()).exit_code == 3

    run(agent_binary, test)


def test_killing_a_terminal_session_kills_all_its_jobs(agent_binary: Path) -> None:
    async def test(client: AgentClient) -> None:
        process = await client.exec(["sh", "-i"], env={"PS1": "$ "}, pty=PtySize(24, 80))
        term = Terminal(process)
        # A job-control shell runs each job in its own process group, which a group kill would miss.
        await process.write_stdin(b"sleep 1235 & echo bg=$!\n")
        background = int((await term.expect(rb"bg=(\d+)")).group(1))
        await process.write_stdin(b"sh -c 'echo fg=$$; exec sleep 1234'\n")
        foreground = int((await term.expect(rb"fg=(\d+)")).group(1))
        assert {os.getpgid(background), os.getpgid(foreground)}.isdisjoint({process.pid})
        await process.signal(signal.SIGKILL)
        assert (await term.wait()).signal == signal.SIGKILL
        async with asyncio.timeout(DEADLINE):  # the kill lands asynchronously; then they are reaped
            while any(_state(pid) not in ("gone", "Z") for pid in (background, foreground)):
                await asyncio.sleep(0.05)

    run(agent_binary, test)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "gone"


def test_closing_stdin_types_eof(agent_binary: Path) -> None:
    async def test(client: AgentClient) -> None:
        process = await client.exec(["cat"], pty=PtySize(24, 80))
        term = Terminal(process)
        await process.write_stdin(b"line\n")
        await term.expect(rb"line\r\nline\r\n")  # the terminal's echo, then cat's copy
        await process.close_stdin()
        assert (await term.wait()).exit_code == 0

    run(agent_binary, test)


def test_output_written_just_before_exit_is_not_lost(agent_binary: Path) -> None:
    async def test(client: AgentClient) -> None:
        process = await client.exec(
            ["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x"], pty=PtySize(24, 80)
        )
        term = Terminal(process)
        assert (await term.wait()).exit_code == 0
        assert term.output.count(b"x") == 300000

    run(agent_binary, test)


def test_a_command_that_cannot_start_gets_an_error(agent_binary: Path) -> None:
    async def test(client: AgentClient) -> None:
        with pytest.raises(GuestError, match="no-such-binary"):
            await client.exec(["no-such-binary"], pty=PtySize(24, 80))
        assert await client.ping() == VERSION  # and the agent serves on

    run(agent_binary, test)


@pytest.mark.parametrize("rows, cols", [(0, 80), (24, 0), (1001, 80), (24, 1001), (-1, 80), (True, 80)])
def test_pty_size_is_checked_on_the_host(rows: int, cols: int) -> None:
    with pytest.raises(InvalidArgument, match="must be 1-1000"):
        PtySize(rows, cols)


async def _raw(sock: socket.socket, decoder: Decoder, frame: bytes) -> list[Frame]:
    """Send one raw frame, then PING (id 99) and return what came back up to the PING's answer."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, frame + encode_request(T.PING, 99))
    got: list[Frame] = []
    async with asyncio.timeout(DEADLINE):
        while not any(f.id == 99 for f in got):
            got += decoder.feed(await loop.sock_recv(sock, 65536))
    return [f for f in got if f.id != 99]


def _exec(id_: int, *extra: tuple[F, FieldValue]) -> bytes:
    return encode_request(T.EXEC, id_, [(F.ARGV, b"true"), *extra])


@pytest.mark.parametrize(
    "fields",
    [
        [(F.ROWS, 24)],  # COLS missing
        [(F.COLS, 80)],
        [(F.ROWS, 0), (F.COLS, 80)],
        [(F.ROWS, 24), (F.COLS, 1001)],
        [(F.ROWS, -5), (F.COLS, 80)],
        [(F.ROWS, 1 << 40), (F.COLS, 80)],
    ],
)
def test_agent_refuses_bad_terminal_sizes(agent_binary: Path, fields: list[tuple[F, FieldValue]]) -> None:
    async def main() -> None:
        host, proc = _spawn(agent_binary)
        decoder = Decoder()
        try:
            replies = await _raw(host, decoder, _exec(1, *fields))
            assert [f.type for f in replies if f.type != T.HELLO] == [T.ERROR]
            error = next(f for f in replies if f.type == T.ERROR).fields()
            assert error.get_int(F.ERRNO) == 22  # EINVAL
        finally:
            host.close()
            proc.wait(timeout=DEADLINE)

    asyncio.run(main())


def test_agent_ignores_bad_or_stray_resizes(agent_binary: Path) -> None:
    """RESIZE has no reply: a bad one is dropped, and the terminal keeps its size."""

    async def main() -> None:
        host, proc = _spawn(agent_binary)
        decoder = Decoder()
        try:
            start = encode_request(
                T.EXEC,
                1,
                [
                    (F.ARGV, b"sh"),
                    (F.ARGV, b"-c"),
                    (F.ARGV, b"read x; stty size"),
                    (F.ROWS, 10),
                    (F.COLS, 20),
                ],
            )
            replies = await _raw(host, decoder, start)
            assert T.STARTED in [f.type for f in replies]
            for bad in (
                [(F.ROWS, 0), (F.COLS, 40)],
                [(F.ROWS, 30)],
                [(F.ROWS, 30), (F.COLS, 40), (F.ROWS, 31)],  # repeated
                b"\x1d\x00\x00\x00\x02\x00\x00",  # ROWS of the wrong width
            ):
                payload = encode_fields(bad) if isinstance(bad, list) else bad
                assert await _raw(host, decoder, encode(T.RESIZE, 1, payload)) == []
            # For an id that is not running, or not a terminal: nothing, and no crash.
            assert await _raw(host, decoder, encode_request(T.RESIZE, 77, [(F.ROWS, 5), (F.COLS, 5)])) == []
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(host, encode(T.STDIN, 1, b"\n"))
            out = b""
            async with asyncio.timeout(DEADLINE):
                while True:
                    frames = decoder.feed(await loop.sock_recv(host, 65536))
                    out += b"".join(f.payload for f in frames if f.type == T.STDOUT)
                    if any(f.type == T.EXIT for f in frames):
                        break
            assert b"10 20" in out
        finally:
            host.close()
            proc.wait(timeout=DEADLINE)

    asyncio.run(main())


def test_client_refuses_a_terminal_on_an_agent_that_predates_it() -> None:
    """An old agent would ignore ROWS/COLS and run the command without a terminal: ask first."""

    async def main() -> None:
        host, guest = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=host)
        client = AgentClient(reader, writer)
        guest.setblocking(False)
        loop = asyncio.get_running_loop()
        attempt = asyncio.create_task(client.exec(["sh"], pty=PtySize(24, 80)))
        frames: list[Frame] = []
        while not frames:
            frames = _host_frames(await loop.sock_recv(guest, 4096))
        assert frames[0].type == T.PING
        await loop.sock_sendall(guest, encode(T.OK, frames[0].id, encode_fields([(F.VERSION, 1)])))
        with pytest.raises(Conflict, match="protocol 1"):
            await asyncio.wait_for(attempt, DEADLINE)
        await client.close()
        guest.close()

    asyncio.run(main())


def _host_frames(buf: bytes) -> list[Frame]:
    """Frames the host sent (the Decoder accepts only guest types, so parse by hand)."""
    frames = []
    while len(buf) >= HEADER.size:
        length, id_, type_, _, _ = HEADER.unpack_from(buf)
        frames.append(Frame(T(type_), id_, buf[HEADER.size : HEADER.size + length]))
        buf = buf[HEADER.size + length :]
    return frames
