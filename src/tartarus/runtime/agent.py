"""Host side of the guest agent RPC: multiplexes requests over one virtio-serial stream.

One reader task demultiplexes guest frames into per-request inboxes (`flow`), bounded in bytes and
never waited on: streamed output is flow-controlled by credit, so a slow or departed consumer holds up
only its own stream. When the channel dies (the agent exited, the VM crashed, the guest sent garbage)
every pending request fails with `SandboxFailed` carrying the reason, so callers get a clear error
instead of a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import secrets
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from tartarus.errors import Conflict, GuestError, InvalidArgument, QuotaExceeded, SandboxFailed
from tartarus.runtime.flow import MAX_STREAMS, WINDOW, Budget, Inbox
from tartarus.runtime.protocol import (
    DATA_TYPES,
    FLAG_ATTACHED,
    FLAG_EOF,
    FLAG_KEEP,
    FLAG_PTY,
    FLAG_RECURSIVE,
    FLAG_STDIN,
    INPUT_MAX,
    MAX_PAYLOAD,
    PTY_MAX_SIZE,
    Decoder,
    F,
    Fields,
    FieldValue,
    Frame,
    ProtocolError,
    T,
    encode,
    encode_request,
    find_reply,
)

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
# Ids from here up are chosen by the host for long-lived requests that outlive one client, such as the
# interpreter started before a snapshot and adopted by every client restored from it.
RESERVED_IDS = 0xFFFF0000
INTERPRETER_ID = RESERVED_IDS + 1
START_ID = RESERVED_IDS + 2  # a template's start command, running in every restored sandbox
# The first protocol version whose agent runs commands on a pseudo-terminal (EXEC ROWS/COLS, RESIZE).
# An older agent would ignore the fields and run the command without one, so the client asks first.
PTY_PROTOCOL = 2
# The first whose agent sends streamed output against credit (WINDOW, CREDIT) and obeys DETACH. An older
# one ignores WINDOW and would answer those frames with ERROR: it gets neither, and a stream of it whose
# consumer falls a buffer behind fails (`flow.Inbox`).
FLOW_PROTOCOL = 3
# The first that keeps a command past its requester (EXEC FLAGS keep) and lets any request address a
# running command by its pid (ATTACH, PROCS, INPUT, PSIGNAL). An older one would ignore the flag and
# answer the rest with ERROR ENOSYS: the client asks first and says why.
PROCESS_PROTOCOL = 4
# The first that resizes a command's terminal by its pid (PRESIZE) and watches directories (WATCH, EVENT).
WATCH_PROTOCOL = 5
MAX_PROCS = 256  # commands an agent runs at once (its MAX_REQS), so PROC frames one PROCS answer may have


@dataclass(frozen=True)
class Output:
    stream: str  # "stdout" or "stderr"
    data: bytes


@dataclass(frozen=True)
class Exit:
    exit_code: int | None
    signal: int | None
    timed_out: bool


@dataclass(frozen=True)
class GuestProcess:
    """A command running in the guest, as PROCS reports it."""

    pid: int
    argv: tuple[str, ...]
    cwd: str | None
    keep: bool  # outlives its requester (a background command)
    pty: bool
    stdin: bool  # its stdin is open
    attached: bool  # a request listens to its output


def _guest_process(fields: Fields) -> GuestProcess:
    flags = fields.get_int(F.FLAGS, 0) or 0
    cwd = fields.get_bytes(F.CWD)
    return GuestProcess(
        pid=fields.get_int(F.PID, 0) or 0,
        argv=tuple(a.decode("utf-8", "replace") for a in fields.get_all(F.ARGV)),
        cwd=None if cwd is None else cwd.decode("utf-8", "replace"),
        keep=bool(flags & FLAG_KEEP),
        pty=bool(flags & FLAG_PTY),
        stdin=bool(flags & FLAG_STDIN),
        attached=bool(flags & FLAG_ATTACHED),
    )


@dataclass(frozen=True)
class PtySize:
    """A terminal's size in character cells."""

    rows: int = 24
    cols: int = 80

    def __post_init__(self) -> None:
        for name, value in (("rows", self.rows), ("cols", self.cols)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= PTY_MAX_SIZE:
                raise InvalidArgument(f"terminal {name} must be 1-{PTY_MAX_SIZE}, not {value!r}")


@dataclass(frozen=True)
class FileInfo:
    name: str
    type: str  # "file", "dir", "symlink", "other"
    mode: int
    size: int
    mtime_ns: int
    uid: int
    gid: int
    link: str | None = None


def _file_type(mode_type: int) -> str:
    import stat

    if stat.S_ISREG(mode_type):
        return "file"
    if stat.S_ISDIR(mode_type):
        return "dir"
    if stat.S_ISLNK(mode_type):
        return "symlink"
    return "other"


def _file_info(fields: Fields) -> FileInfo:
    link = fields.get_bytes(F.LINK)
    return FileInfo(
        name=fields.get_str(F.NAME),
        type=_file_type(fields.get_int(F.TYPE, 0) or 0),
        mode=(fields.get_int(F.MODE, 0) or 0) & 0o7777,
        size=fields.get_int(F.SIZE, 0) or 0,
        mtime_ns=fields.get_int(F.MTIME_NS, 0) or 0,
        uid=fields.get_int(F.UID, 0) or 0,
        gid=fields.get_int(F.GID, 0) or 0,
        link=None if link is None else link.decode("utf-8", "replace"),
    )


def _guest_error(frame: Frame) -> GuestError:
    fields = frame.fields()
    errno_ = fields.get_int(F.ERRNO, 0) or 0
    message = fields.get_str(F.MESSAGE) or os.strerror(errno_)
    return GuestError(message, errno_)


def _path(path: str) -> bytes:
    if not path.startswith("/"):
        raise InvalidArgument(f"guest paths must be absolute: {path!r}")
    raw = path.encode()
    if b"\0" in raw or len(raw) >= 4096:
        raise InvalidArgument("guest path contains NUL or is too long")
    return raw


class AgentClient:
    """Speaks docs/protocol.md over a connected stream to one guest agent."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        eof_reason: Callable[[], Awaitable[str]] | None = None,
        *,
        resync: bool = False,
    ) -> None:
        self._reader = reader
        self._eof_reason = eof_reason
        self._writer = writer
        # Joining a stream another client used (`resync`): ids start at a random point, so a late frame
        # about one of its requests cannot be taken for an answer to ours.
        self._ids = itertools.count(1 + secrets.randbelow(1 << 30) if resync else 1)
        self._sync_id = 1 + secrets.randbelow(RESERVED_IDS - 1) if resync else None
        self._synced = asyncio.Event()
        self._queues: dict[int, Inbox] = {}
        self._streams: set[int] = set()  # ids of open commands and file reads (at most MAX_STREAMS)
        self._budget = Budget()
        self._hello = asyncio.Event()
        self._failure: BaseException | None = None
        self._write_lock = asyncio.Lock()
        self._task = asyncio.create_task(self._read_loop(), name="agent-reader")
        self._version: int | None = None
        self.hellos = 0

    # ---- connection --------------------------------------------------------------------------

    async def wait_hello(self) -> None:
        """Wait until the agent announces itself (boot, or restart after it died)."""
        waiter = asyncio.create_task(self._hello.wait())
        try:
            await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not self._hello.is_set():
            raise self._failure or SandboxFailed("guest agent channel closed before it said hello")

    def assume_running(self) -> None:
        """The agent was already serving before this client existed (a restored snapshot): no HELLO
        will come, and the next one means the agent died and was restarted."""
        self.hellos = max(self.hellos, 1)
        self._hello.set()

    def fail(self, error: BaseException) -> None:
        """Fail every pending and future request with `error` (the VM died, or the agent did)."""
        if self._failure is None:
            self._failure = error
        for inbox in self._queues.values():
            inbox.fail(error)

    def agent_restarted(self, reason: str) -> None:
        """The agent closed its port: in-flight requests are lost, new ones go to the next agent."""
        self._version = None
        error = SandboxFailed(reason)
        for inbox in self._queues.values():
            inbox.fail(error)
        self._queues.clear()
        self._streams.clear()
        self._hello.clear()

    @property
    def serving(self) -> bool:
        """No failure seen and no restart pending: the agent that last answered still serves."""
        return self._failure is None and self._hello.is_set() and not self._task.done()

    @property
    def queued_bytes(self) -> int:
        """Guest output received and not yet taken by its callers, over all requests."""
        return self._budget.queued

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        # Whoever still waits on a reply (a streamed exec, a terminal) hears why, instead of hanging.
        self.fail(SandboxFailed("the sandbox was stopped while the request ran"))
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def resync(self, timeout: float) -> None:
        """Find a frame boundary in a stream another client left mid-way (see `find_reply`)."""
        assert self._sync_id is not None, "not made with resync=True"
        id_, queue = self._open(self._sync_id)
        try:
            await self._send(encode_request(T.PING, id_))
            async with asyncio.timeout(timeout):
                reply = await queue.get()
            self._version = reply.fields().get_int(F.VERSION)
        except TimeoutError:
            raise SandboxFailed(f"guest agent did not answer within {timeout:.0f} s") from None
        finally:
            self._done(id_)
        self.assume_running()

    async def _read_loop(self) -> None:
        decoder = Decoder()
        skipped = bytearray()
        try:
            while True:
                data = await self._reader.read(CHUNK)
                if not data:
                    # The VMM is going away; say why (panic, power-off, kill) rather than just "EOF".
                    reason = await self._eof_reason() if self._eof_reason else "guest agent channel closed"
                    raise SandboxFailed(reason)
                if self._sync_id is not None and not self._synced.is_set():
                    skipped += data
                    at = find_reply(skipped, self._sync_id)
                    if at < 0:
                        del skipped[: max(0, len(skipped) - 16)]  # a header may straddle two reads
                        continue
                    data, skipped = bytes(skipped[at:]), bytearray()
                    self._synced.set()
                for frame in decoder.feed(data):
                    self._dispatch(frame)
        except ProtocolError as e:
            self.fail(SandboxFailed(f"guest agent broke the protocol: {e}"))
        except SandboxFailed as e:
            self.fail(e)
        except (ConnectionError, OSError) as e:
            self.fail(SandboxFailed(f"guest agent channel error: {e}"))

    def _dispatch(self, frame: Frame) -> None:
        """Route one frame. Never waits: this reader serves every request of the sandbox."""
        fields = None if frame.type in DATA_TYPES else frame.fields()  # validate at the boundary
        if frame.type == T.HELLO:
            assert fields is not None
            self.hellos += 1
            if self.hellos > 1:
                # A new agent instance: the old one died with whatever it was doing. (QMP's
                # VSERPORT_CHANGE cannot tell us reliably: QEMU throttles it to one per second.)
                self.agent_restarted("guest agent died and was restarted; the request was lost")
            self._version = fields.get_int(F.VERSION)
            self._hello.set()
            return
        inbox = self._queues.get(frame.id)
        if inbox is None:
            return  # a late frame for a request the caller abandoned: dropped, never queued
        if not inbox.put(frame):
            inbox.fail(inbox.overrun(frame))
            self._tell(encode(T.DETACH, frame.id))  # and whatever else it sends is dropped above

    # ---- requests ----------------------------------------------------------------------------

    def _open(self, id_: int | None = None, *, stream: bool = False) -> tuple[int, Inbox]:
        if self._failure is not None:
            raise self._failure
        if stream and len(self._streams) >= MAX_STREAMS:
            raise QuotaExceeded(
                f"this sandbox already has {MAX_STREAMS} streams open (commands, file reads):"
                " let one finish before starting another"
            )
        if id_ is None:
            id_ = next(self._ids)
            if id_ >= RESERVED_IDS:
                raise SandboxFailed("request ids exhausted")
        elif id_ in self._queues:
            raise InvalidArgument(f"request id {id_} is in use")
        inbox = Inbox(self._budget, functools.partial(self._credit, id_))
        self._queues[id_] = inbox
        if stream:
            self._streams.add(id_)
        return id_, inbox

    async def _open_stream(
        self,
        type_: T,
        items: Sequence[tuple[F, FieldValue]],
        *,
        expect: T | None,
        request_id: int | None = None,
    ) -> tuple[int, Inbox, Frame]:
        """Open a stream request and await its first answer: a guest error is raised (and the request
        ended), as is an answer other than `expect` (when given); the caller owns the stream after."""
        id_, queue = self._open(request_id, stream=True)
        try:
            await self._send(encode_request(type_, id_, [*items, (F.WINDOW, WINDOW)]))
            frame = await queue.get()
        except BaseException:
            self._detach(id_)
            raise
        if frame.type == T.ERROR:
            self._done(id_)
            raise _guest_error(frame)
        if expect is not None and frame.type != expect:
            self._done(id_)
            raise SandboxFailed(f"guest agent answered {frame.type.name} to {type_.name}")
        return id_, queue, frame

    def _done(self, id_: int) -> None:
        """The request ended: forget it and free what it still had queued."""
        inbox = self._queues.pop(id_, None)
        if inbox is not None:
            inbox.close()
        self._streams.discard(id_)

    def _detach(self, id_: int) -> None:
        """The caller stopped listening before the end: the guest drops the request (a read's file is
        closed, a command's output discarded) and sends nothing more about it."""
        self._done(id_)
        self._tell(encode(T.DETACH, id_))

    def _credit(self, id_: int, size: int) -> None:
        if id_ in self._queues:
            self._tell(encode_request(T.CREDIT, id_, [(F.SIZE, size)]))

    def _tell(self, frame: bytes) -> None:
        """Send a small frame (CREDIT, DETACH) now, from synchronous code: one `write` puts the whole
        frame in the transport, so it cannot interleave with a `_send`. An agent too old to know these
        frames does not get them."""
        if self._failure is None and (self._version or 0) >= FLOW_PROTOCOL and not self._writer.is_closing():
            self._writer.write(frame)

    async def _know_version(self) -> None:
        """Flow control needs the agent's version before the first credit is due."""
        if self._version is None:
            await self.version()

    async def _send(self, data: bytes) -> None:
        if self._failure is not None:
            raise self._failure
        async with self._write_lock:
            self._writer.write(data)
            await self._writer.drain()

    async def _call(self, type_: T, items: Sequence[tuple[F, FieldValue]] = ()) -> Fields:
        id_, queue = self._open()
        try:
            await self._send(encode_request(type_, id_, items))
            frame = await queue.get()
            if frame.type == T.ERROR:
                raise _guest_error(frame)
            if frame.type != T.OK:
                raise SandboxFailed(f"guest agent answered {frame.type.name} to {type_.name}")
            return frame.fields()
        finally:
            self._done(id_)

    async def ping(self) -> int:
        self._version = (await self._call(T.PING)).get_int(F.VERSION, 0) or 0
        return self._version

    async def version(self) -> int:
        """The agent's protocol version, asked once: a sandbox woken from an old hibernation image
        runs the agent it was captured with, which may predate features this host asks for."""
        if self._version is None:
            self._version = await self.ping()
        return self._version

    async def configure(
        self,
        *,
        time_ns: int | None = None,
        entropy: bytes | None = None,
        hostname: str | None = None,
        machine_id: str | None = None,
        disk_bytes: int | None = None,
    ) -> None:
        """Set what makes a restored clone distinct; `disk_bytes`: grow the writable layer's filesystem
        to that size (its disk must have grown first: `Sandbox.grow_disk`)."""
        items: list[tuple[F, FieldValue]] = []
        if time_ns is not None:
            items.append((F.TIME_NS, time_ns))
        if entropy:
            items.append((F.ENTROPY, entropy))
        if hostname:
            items.append((F.HOSTNAME, hostname.encode()))
        if machine_id:
            items.append((F.MACHINE_ID, machine_id.encode()))
        if disk_bytes is not None:
            items.append((F.SIZE, disk_bytes))
        version = (await self._call(T.CONFIGURE, items)).get_int(F.VERSION)
        if version is not None:  # an agent of protocol 3 or later says which
            self._version = version

    async def stat(self, path: str) -> FileInfo:
        return _file_info(await self._call(T.STAT, [(F.PATH, _path(path))]))

    async def mkdir(self, path: str, *, parents: bool = True, mode: int = 0o755) -> None:
        await self._call(T.MKDIR, [(F.PATH, _path(path)), (F.MODE, mode), (F.FLAGS, int(parents))])

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._call(T.REMOVE, [(F.PATH, _path(path)), (F.FLAGS, int(recursive))])

    async def rename(self, path: str, new_path: str) -> None:
        await self._call(T.RENAME, [(F.PATH, _path(path)), (F.NEWPATH, _path(new_path))])

    async def list(self, path: str, limit: int | None = None) -> tuple[list[FileInfo], bool]:
        """A directory's entries, at most `limit` of them (in the guest's order), and whether it held
        more. Entries past the limit are read and dropped, so a huge directory costs no memory."""
        id_, queue = self._open()
        try:
            await self._send(encode_request(T.LIST, id_, [(F.PATH, _path(path))]))
            entries: list[FileInfo] = []
            truncated = False
            while True:
                frame = await queue.get()
                if frame.type == T.ENTRY:
                    if limit is None or len(entries) < limit:
                        entries.append(_file_info(frame.fields()))
                    else:
                        truncated = True
                elif frame.type == T.END:
                    return entries, truncated
                elif frame.type == T.ERROR:
                    raise _guest_error(frame)
                else:
                    raise SandboxFailed(f"guest agent answered {frame.type.name} to LIST")
        finally:
            self._done(id_)

    async def read_file(self, path: str) -> AsyncGenerator[bytes, None]:
        """Stream a guest file's content; the first chunk is awaited before returning (errors early).
        Closing the generator early (`aclose`) closes the file in the guest."""
        raw = _path(path)
        await self._know_version()
        id_, queue, first = await self._open_stream(T.READ, [(F.PATH, raw)], expect=None)

        async def chunks() -> AsyncGenerator[bytes, None]:
            frame = first
            ended = False
            try:
                while True:
                    if frame.type == T.DATA:
                        yield frame.payload
                    elif frame.type == T.END:
                        ended = True
                        return
                    elif frame.type == T.ERROR:
                        ended = True
                        raise _guest_error(frame)
                    else:
                        raise SandboxFailed(f"guest agent answered {frame.type.name} to READ")
                    frame = await queue.get()
            finally:
                if ended:
                    self._done(id_)
                else:
                    self._detach(id_)

        return chunks()

    async def write_file(
        self, path: str, data: bytes | AsyncIterable[bytes], *, mode: int = 0o644, append: bool = False
    ) -> int:
        id_, queue = self._open()
        answered = False
        try:
            await self._send(
                encode_request(T.WRITE, id_, [(F.PATH, _path(path)), (F.MODE, mode), (F.FLAGS, append << 1)])
            )

            async def send(chunk: bytes) -> None:
                for i in range(0, len(chunk), CHUNK):
                    if not queue.empty():  # the guest already refused: stop sending
                        return
                    await self._send(encode(T.WRITE_DATA, id_, chunk[i : i + CHUNK]))

            if isinstance(data, bytes | bytearray | memoryview):
                await send(bytes(data))
            else:
                async for chunk in data:
                    await send(chunk)
                    if not queue.empty():
                        break
            await self._send(encode(T.WRITE_END, id_))
            frame = await queue.get()
            answered = True
            if frame.type == T.ERROR:
                raise _guest_error(frame)
            if frame.type != T.OK:
                raise SandboxFailed(f"guest agent answered {frame.type.name} to WRITE")
            return frame.fields().get_int(F.SIZE, 0) or 0
        finally:
            if answered:
                self._done(id_)
            else:  # the upload broke off: the guest removes its temporary file and frees the request
                self._detach(id_)

    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: bool = False,
        pty: PtySize | None = None,
        request_id: int | None = None,
        keep: bool = False,
    ) -> Process:
        """Start a command. With `pty` it runs on a new pseudo-terminal of that size as its
        controlling terminal: stdout and stderr arrive merged as "stdout", stdin is always open, and
        closing stdin types the terminal's EOF character. With `keep` it outlives this request
        (`abandon`, a daemon restart): `attach` to it again by its pid."""
        if not argv:
            raise InvalidArgument("argv must not be empty")
        items: list[tuple[F, FieldValue]] = [(F.ARGV, a.encode()) for a in argv]
        for key, value in (env or {}).items():
            if not key or "=" in key:
                raise InvalidArgument(f"invalid environment variable name {key!r}")
            items.append((F.ENV, f"{key}={value}".encode()))
        if cwd:
            items.append((F.CWD, _path(cwd)))
        if user:
            items.append((F.USER, user.encode()))
        if timeout:
            items.append((F.TIMEOUT_MS, max(1, int(timeout * 1000))))
        items.append((F.STDIN, int(stdin or pty is not None)))
        if pty is not None:
            version = await self.version()
            if version < PTY_PROTOCOL:
                raise Conflict(
                    f"this sandbox's guest agent speaks protocol {version}; a terminal needs {PTY_PROTOCOL}"
                    " (the sandbox was made by an older Tartarus: create a new one)"
                )
            items += [(F.ROWS, pty.rows), (F.COLS, pty.cols)]
        if keep:
            await self._need_processes("a background command")
            items.append((F.FLAGS, FLAG_KEEP))
        try:
            request = encode_request(T.EXEC, 0, [*items, (F.WINDOW, WINDOW)])
        except ValueError as e:
            raise InvalidArgument(str(e)) from e
        if len(request) > MAX_PAYLOAD:
            raise InvalidArgument("command line and environment exceed 1 MiB")
        await self._know_version()
        id_, queue, frame = await self._open_stream(T.EXEC, items, expect=T.STARTED, request_id=request_id)
        return Process(self, id_, queue, frame.fields().get_int(F.PID, 0) or 0, keep=keep)

    async def _need_processes(self, what: str, protocol: int = PROCESS_PROTOCOL) -> None:
        version = await self.version()
        if version < protocol:
            raise Conflict(
                f"this sandbox's guest agent speaks protocol {version}; {what} needs {protocol}"
                " (the sandbox was made by an older Tartarus: create a new one)"
            )

    async def attach(self, pid: int) -> Process:
        """Take over the stream of a running command by its guest pid: its output from now on and its
        exit. A listener it had (its starter, an earlier attach) ends with `GuestError` EBUSY; a
        command not running (or the sandbox's own) is `GuestError` ESRCH."""
        await self._need_processes("attaching to a running command")
        id_, queue, frame = await self._open_stream(T.ATTACH, [(F.PID, pid)], expect=T.STARTED)
        flags = frame.fields().get_int(F.FLAGS, 0) or 0
        return Process(self, id_, queue, pid, keep=bool(flags & FLAG_KEEP))

    async def processes(self) -> tuple[GuestProcess, ...]:
        """The running commands a client may address (not the sandbox's own: interpreter, start command)."""
        await self._need_processes("listing commands")
        id_, queue = self._open()
        try:
            await self._send(encode_request(T.PROCS, id_))
            found: tuple[GuestProcess, ...] = ()
            while True:
                frame = await queue.get()
                if frame.type == T.PROC:
                    if len(found) >= MAX_PROCS:  # the agent runs at most that many: a hostile one lies
                        raise SandboxFailed(f"guest agent listed more than {MAX_PROCS} commands")
                    found += (_guest_process(frame.fields()),)
                elif frame.type == T.END:
                    return found
                elif frame.type == T.ERROR:
                    raise _guest_error(frame)
                else:
                    raise SandboxFailed(f"guest agent answered {frame.type.name} to PROCS")
        finally:
            self._done(id_)

    async def send_input(self, pid: int, data: bytes, *, close: bool = False) -> None:
        """Write to a running command's stdin by its pid, then (`close`) close it (on a terminal:
        type ^D). ESRCH: no such command; EPIPE: its stdin is closed (or was never opened)."""
        await self._need_processes("input to a running command")
        chunks = [data[i : i + INPUT_MAX] for i in range(0, len(data), INPUT_MAX)] or [b""]
        for n, chunk in enumerate(chunks):
            items: list[tuple[F, FieldValue]] = [(F.PID, pid)]
            if chunk:
                items.append((F.INPUT, chunk))
            if close and n == len(chunks) - 1:
                items.append((F.FLAGS, FLAG_EOF))
            elif not chunk:
                continue
            await self._call(T.INPUT, items)

    async def resize_pid(self, pid: int, size: PtySize) -> None:
        """Set the terminal size of a running command by its pid. ESRCH: no such command; ENOTTY: it
        runs on no terminal."""
        await self._need_processes("resizing a running command's terminal", WATCH_PROTOCOL)
        await self._call(T.PRESIZE, [(F.PID, pid), (F.ROWS, size.rows), (F.COLS, size.cols)])

    async def watch(self, path: str, *, recursive: bool = False) -> Watch:
        """Follow a directory's changes (inotify in the guest) until the returned watch is closed."""
        raw = _path(path)
        await self._need_processes("watching a directory", WATCH_PROTOCOL)
        items: list[tuple[F, FieldValue]] = [(F.PATH, raw), (F.FLAGS, FLAG_RECURSIVE if recursive else 0)]
        id_, queue, _ = await self._open_stream(T.WATCH, items, expect=T.OK)
        return Watch(self, id_, queue)

    async def signal_pid(self, pid: int, signum: int) -> None:
        """Signal a running command by its pid (its process group; on a terminal its session)."""
        await self._need_processes("signalling a running command")
        await self._call(T.PSIGNAL, [(F.PID, pid), (F.SIGNAL, signum)])

    def adopt(self, request_id: int, pid: int) -> Process:
        """Take over a command started by an earlier client of the same guest (snapshot restore). That
        client may have left the guest without credit for it (output it never drained): grant a fresh
        window, which `flow.STREAM_BUFFER` allows for on top of whatever credit is left."""
        id_, inbox = self._open(request_id, stream=True)
        self._credit(id_, WINDOW)
        return Process(self, id_, inbox, pid)


class Process:
    """A command running in the guest: iterate `events()` for output, then its `Exit`."""

    def __init__(self, client: AgentClient, id_: int, inbox: Inbox, pid: int, *, keep: bool = False) -> None:
        self._client = client
        self._id = id_
        self._inbox = inbox
        self.pid = pid
        self.keep = keep  # outlives this stream: `abandon` leaves it running, reachable by pid
        self.exit: Exit | None = None

    async def next_event(self) -> Output | Exit:
        """The next output chunk or the exit status. Safe to cancel: no frame is lost."""
        if self.exit is not None:
            raise StopAsyncIteration
        frame = await self._inbox.get()
        if frame.type == T.STDOUT:
            return Output("stdout", frame.payload)
        if frame.type == T.STDERR:
            return Output("stderr", frame.payload)
        if frame.type == T.EXIT:
            fields = frame.fields()
            self.exit = Exit(
                exit_code=fields.get_int(F.EXIT_CODE),
                signal=fields.get_int(F.SIGNAL),
                timed_out=bool(fields.get_int(F.TIMED_OUT, 0)),
            )
            self._client._done(self._id)
            return self.exit
        if frame.type == T.ERROR:
            raise _guest_error(frame)
        raise SandboxFailed(f"guest agent sent {frame.type.name} during EXEC")

    async def events(self) -> AsyncIterator[Output | Exit]:
        while self.exit is None:
            yield await self.next_event()

    async def write_stdin(self, data: bytes) -> None:
        for i in range(0, len(data), CHUNK):
            await self._client._send(encode(T.STDIN, self._id, data[i : i + CHUNK]))

    async def close_stdin(self) -> None:
        await self._client._send(encode(T.STDIN, self._id))

    async def signal(self, signum: int) -> None:
        """Signal the command's process group (and, on a terminal, its foreground job)."""
        await self._client._send(encode_request(T.SIGNAL, self._id, [(F.SIGNAL, signum)]))

    async def resize(self, rows: int, cols: int) -> None:
        """Set the terminal size of a command started with `pty` (its foreground job gets SIGWINCH)."""
        size = PtySize(rows, cols)
        await self._client._send(
            encode_request(T.RESIZE, self._id, [(F.ROWS, size.rows), (F.COLS, size.cols)])
        )

    def abandon(self) -> None:
        """Stop tracking this command (the caller went away): the guest discards its output (it runs on
        unless killed), and frames already on their way are dropped."""
        if self.exit is None:
            self._client._detach(self._id)


@dataclass(frozen=True)
class WatchEvent:
    """One change in a watched directory: the guest's inotify mask and the path below the directory
    (empty for the directory itself, and for an overflow: events were lost)."""

    mask: int
    name: str


class Watch:
    """A directory being watched: `next_event` until it returns None (the directory went away)."""

    def __init__(self, client: AgentClient, id_: int, inbox: Inbox) -> None:
        self._client = client
        self._id = id_
        self._inbox = inbox
        self.ended = False

    async def next_event(self) -> WatchEvent | None:
        """The next change, or None once the watched directory is gone. Safe to cancel."""
        if self.ended:
            return None
        frame = await self._inbox.get()
        if frame.type == T.EVENT:
            fields = frame.fields()
            return WatchEvent(mask=fields.get_int(F.TYPE, 0) or 0, name=fields.get_str(F.NAME))
        self.ended = True
        self._client._done(self._id)
        if frame.type == T.END:
            return None
        if frame.type == T.ERROR:
            raise _guest_error(frame)
        raise SandboxFailed(f"guest agent sent {frame.type.name} during WATCH")

    def close(self) -> None:
        """Stop watching: the guest closes its inotify instance."""
        if not self.ended:
            self.ended = True
            self._client._detach(self._id)
