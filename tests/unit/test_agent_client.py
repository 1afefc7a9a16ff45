"""The host agent client against a hostile peer on a socketpair: it fails the sandbox, never the host."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from tartarus.errors import QuotaExceeded, SandboxFailed
from tartarus.runtime.agent import AgentClient, Exit, Output, Process
from tartarus.runtime.flow import FRAME_COST, MAX_STREAMS, REFILL, SANDBOX_BUFFER, STREAM_BUFFER, WINDOW
from tartarus.runtime.protocol import HEADER, MAX_PAYLOAD, VERSION, F, Frame, T, encode, encode_fields


async def _client() -> tuple[AgentClient, socket.socket]:
    host, guest = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=host)
    guest.setblocking(False)
    return AgentClient(reader, writer), guest


@pytest.mark.parametrize(
    "garbage",
    [
        HEADER.pack(MAX_PAYLOAD + 1, 1, T.OK, 0, 0),  # oversized
        HEADER.pack(4, 1, 0x7F, 0, 0) + b"abcd",  # unknown type
        encode(T.OK, 1, b"\x10\x00\x00\x00\x08\x00"),  # integer field cut short
    ],
)
def test_garbage_fails_pending_requests_cleanly(garbage: bytes) -> None:
    async def main() -> str:
        client, guest = await _client()
        ping = asyncio.create_task(client.ping())
        await asyncio.sleep(0)
        await asyncio.get_running_loop().sock_sendall(guest, garbage)
        with pytest.raises(SandboxFailed) as e:
            await asyncio.wait_for(ping, 5)
        with pytest.raises(SandboxFailed):  # and every later call fails fast
            await client.ping()
        await client.close()
        guest.close()
        return e.value.message

    assert "broke the protocol" in asyncio.run(main())


def test_guest_closing_the_channel_fails_requests() -> None:
    async def main() -> None:
        client, guest = await _client()
        ping = asyncio.create_task(client.ping())
        await asyncio.sleep(0)
        guest.close()
        with pytest.raises(SandboxFailed, match="channel"):
            await asyncio.wait_for(ping, 5)
        await client.close()

    asyncio.run(main())


def test_replies_are_routed_by_request_id() -> None:
    async def main() -> tuple[int, int]:
        client, guest = await _client()
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(client.ping())
        second = asyncio.create_task(client.ping())
        await asyncio.sleep(0.01)
        # Answer in reverse order with different versions: each caller must get its own answer.
        await loop.sock_sendall(guest, encode(T.OK, 2, encode_fields([(F.VERSION, 22)])))
        await loop.sock_sendall(guest, encode(T.OK, 1, encode_fields([(F.VERSION, 11)])))
        result = (await first, await second)
        await client.close()
        guest.close()
        return result

    assert asyncio.run(main()) == (11, 22)


# ---- flow control: a stream's output is bounded in bytes and never holds up the channel -------------


class FakeGuest:
    """The guest end of the socketpair, scripted by a test: it reads what the host sends and answers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""

    async def send(self, *frames: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, b"".join(frames))

    async def recv(self) -> Frame:
        """The host's next frame (host frame types are not what `Decoder` accepts from a guest)."""
        loop = asyncio.get_running_loop()
        while True:
            if len(self._buf) >= HEADER.size:
                length, id_, type_, _, _ = HEADER.unpack_from(self._buf)
                if len(self._buf) >= HEADER.size + length:
                    payload = self._buf[HEADER.size : HEADER.size + length]
                    self._buf = self._buf[HEADER.size + length :]
                    return Frame(T(type_), id_, payload)
            data = await loop.sock_recv(self.sock, 1 << 16)
            assert data, "the host closed the channel"
            self._buf += data

    async def until(self, type_: T) -> tuple[Frame, list[Frame]]:
        """Read up to the host's next `type_` frame; also returns the frames that came before it."""
        before: list[Frame] = []
        async with asyncio.timeout(5):
            while (frame := await self.recv()).type != type_:
                before.append(frame)
        return frame, before

    async def answer_ping(self) -> list[Frame]:
        """Answer the host's next PING; returns what the host sent before it."""
        ping, before = await self.until(T.PING)
        await self.send(encode(T.OK, ping.id, encode_fields([(F.VERSION, VERSION)])))
        return before

    async def start(self, pid: int = 42) -> Frame:
        """Answer the host's next EXEC with STARTED; returns the request."""
        request, _ = await self.until(T.EXEC)
        await self.send(encode(T.STARTED, request.id, encode_fields([(F.PID, pid)])))
        return request


async def _flowing(version: int = VERSION) -> tuple[AgentClient, FakeGuest]:
    """A client whose (fake) agent said hello with `version`."""
    client, sock = await _client()
    guest = FakeGuest(sock)
    await guest.send(encode(T.HELLO, 0, encode_fields([(F.VERSION, version)])))
    await asyncio.wait_for(client.wait_hello(), 5)
    return client, guest


async def _exec(client: AgentClient, guest: FakeGuest) -> tuple[Process, int]:
    task = asyncio.create_task(client.exec(["yes"]))
    request = await guest.start()
    return await asyncio.wait_for(task, 5), request.id


async def _ping(client: AgentClient, guest: FakeGuest) -> list[Frame]:
    """A ping answered: the reader got through everything the guest sent before the answer."""
    answered = asyncio.create_task(guest.answer_ping())
    assert await asyncio.wait_for(client.ping(), 5) == VERSION
    return await answered


def test_a_stream_nobody_reads_holds_up_nothing_and_is_freed_when_abandoned() -> None:
    """More output than the old 256-frame queue held, never read: other calls are still answered (the
    reader used to block on the full queue, and for good once the caller abandoned the stream)."""

    async def main() -> None:
        client, guest = await _flowing()
        process, id_ = await _exec(client, guest)
        await guest.send(*(encode(T.STDOUT, id_, b"y\n" * 256) for _ in range(300)))
        await _ping(client, guest)
        assert client.queued_bytes == 300 * (512 + FRAME_COST)
        process.abandon()
        assert client.queued_bytes == 0  # freed at once
        detach, _ = await guest.until(T.DETACH)  # the guest is told to stop sending
        assert detach.id == id_
        await guest.send(
            encode(T.STDOUT, id_, b"late"), encode(T.EXIT, id_, encode_fields([(F.EXIT_CODE, 0)]))
        )
        await _ping(client, guest)
        assert client.queued_bytes == 0  # late frames for it are dropped, not queued
        await client.close()

    asyncio.run(main())


def test_a_guest_flooding_past_its_window_fails_that_stream_within_a_bound() -> None:
    async def main() -> None:
        client, guest = await _flowing()
        process, id_ = await _exec(client, guest)
        other, other_id = await _exec(client, guest)
        # Three windows of output, ignoring credit: the host must not buffer it.
        await guest.send(*(encode(T.STDOUT, id_, bytes(1 << 16)) for _ in range(3 * WINDOW >> 16)))
        await guest.send(encode(T.STDOUT, other_id, b"fine"))
        told = await _ping(client, guest)
        assert client.queued_bytes <= STREAM_BUFFER + len(b"fine") + FRAME_COST
        assert [(f.type, f.id) for f in told] == [(T.DETACH, id_)]  # the guest is told to stop
        with pytest.raises(SandboxFailed, match="overran request"):
            await process.next_event()
        with pytest.raises(SandboxFailed, match="overran request"):  # and again: the stream is over
            await process.next_event()
        process.abandon()
        assert client.queued_bytes == len(b"fine") + FRAME_COST
        assert await other.next_event() == Output("stdout", b"fine")  # the other stream is untouched
        await client.close()

    asyncio.run(main())


def test_all_streams_of_a_sandbox_together_stay_within_its_bound() -> None:
    async def main() -> None:
        client, guest = await _flowing()
        streams = [await _exec(client, guest) for _ in range(MAX_STREAMS)]
        chunk = bytes(1 << 16)
        per_stream = STREAM_BUFFER // (len(chunk) + FRAME_COST)  # each within its own bound
        assert MAX_STREAMS * per_stream * (len(chunk) + FRAME_COST) > SANDBOX_BUFFER
        for _, id_ in streams:
            await guest.send(*(encode(T.STDOUT, id_, chunk) for _ in range(per_stream)))
        await _ping(client, guest)
        assert client.queued_bytes <= SANDBOX_BUFFER
        failed = 0
        for process, _ in streams:
            try:
                await process.next_event()
            except SandboxFailed as e:
                assert "overran" in e.message
                failed += 1
        assert failed > 0
        for process, _ in streams:
            process.abandon()
        assert client.queued_bytes == 0
        await client.close()

    asyncio.run(main())


def test_concurrent_streams_per_sandbox_are_limited() -> None:
    async def main() -> None:
        client, guest = await _flowing()
        streams = [await _exec(client, guest) for _ in range(MAX_STREAMS)]
        with pytest.raises(QuotaExceeded, match=f"{MAX_STREAMS} streams open"):
            await asyncio.wait_for(client.exec(["one-too-many"]), 5)
        with pytest.raises(QuotaExceeded):
            await asyncio.wait_for(client.read_file("/etc/hostname"), 5)
        await _ping(client, guest)  # short requests are not streams
        process, id_ = streams[0]
        await guest.send(encode(T.EXIT, id_, encode_fields([(F.EXIT_CODE, 0)])))
        assert isinstance(await process.next_event(), Exit)
        await _exec(client, guest)  # a stream ended: room for one more
        await client.close()

    asyncio.run(main())


def test_drained_output_is_returned_to_the_guest_as_credit() -> None:
    async def main() -> None:
        client, guest = await _flowing()
        task = asyncio.create_task(client.exec(["yes"]))
        request = await guest.start()
        process = await task
        assert request.fields().get_int(F.WINDOW) == WINDOW
        chunk = bytes(1 << 16)
        await guest.send(*(encode(T.STDOUT, request.id, chunk) for _ in range(16)))
        for _ in range(16):
            assert await process.next_event() == Output("stdout", chunk)
        granted = 0
        for frame in await _ping(client, guest):
            assert frame.type == T.CREDIT and frame.id == request.id
            granted += frame.fields().get_int(F.SIZE) or 0
        drained = 16 * (len(chunk) + FRAME_COST)
        assert drained - REFILL < granted <= drained
        await client.close()

    asyncio.run(main())


def test_an_agent_without_flow_control_gets_no_credit_or_detach() -> None:
    """Protocol 2 knows neither frame (it would answer ERROR): its streams are only bounded."""

    async def main() -> None:
        client, guest = await _flowing(version=2)
        process, id_ = await _exec(client, guest)
        await guest.send(*(encode(T.STDOUT, id_, bytes(1 << 16)) for _ in range(16)))
        for _ in range(16):
            await process.next_event()
        process.abandon()
        assert [f.type for f in await _ping(client, guest)] == []
        await client.close()

    asyncio.run(main())


def test_an_upload_that_breaks_off_is_detached() -> None:
    """The guest frees the write and removes its temporary file, instead of holding them for good."""

    async def main() -> None:
        client, guest = await _flowing()

        async def body() -> AsyncIterator[bytes]:
            yield b"part"
            raise ConnectionResetError("the client went away")

        with pytest.raises(ConnectionResetError):
            await client.write_file("/tmp/x", body())
        detach, before = await guest.until(T.DETACH)
        assert [f.type for f in before] == [T.WRITE, T.WRITE_DATA] and detach.id == before[0].id
        await client.close()

    asyncio.run(main())
