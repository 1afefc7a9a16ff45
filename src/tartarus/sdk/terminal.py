"""Interactive terminals in a sandbox (`sb.pty.create()`), over the daemon's WebSocket endpoint.

httpx speaks no WebSocket, so this uses the `websockets` library: its threaded client for `Pty`, its
asyncio client for `AsyncPty`, each over TCP or the daemon's unix socket like the rest of the SDK.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import websockets
from websockets.asyncio import client as aio_client
from websockets.sync import client as sync_client

from tartarus import errors
from tartarus.sdk._core import Endpoint, argv_of, error_from, raise_for_error

OPEN_TIMEOUT = 60.0  # the handshake may wake a hibernated sandbox first
CLOSE_TIMEOUT = 10.0


@dataclass(frozen=True)
class PtyRequest:
    """Where and how to open a terminal: the endpoint's URL and the handshake's headers."""

    uri: str
    uds: str | None
    headers: dict[str, str]

    @classmethod
    def of(
        cls,
        endpoint: Endpoint,
        sandbox_id: str,
        *,
        rows: int,
        cols: int,
        cmd: str | Sequence[str] | None,
        env: dict[str, str] | None,
        cwd: str | None,
        user: str | None,
    ) -> PtyRequest:
        params: list[tuple[str, str | int]] = [("rows", rows), ("cols", cols)]
        params += [("argv", a) for a in (argv_of(cmd) if cmd is not None else [])]
        params += [("env", f"{k}={v}") for k, v in (env or {}).items()]
        if cwd:
            params.append(("cwd", cwd))
        if user:
            params.append(("user", user))
        base = endpoint.base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        uri = f"{base}/v1/sandboxes/{sandbox_id}/pty?{urlencode(params)}"
        return cls(uri, endpoint.uds, endpoint.headers())


def _refused(exc: Exception, where: str) -> errors.TartarusError:
    """The daemon's answer to a handshake it refused, as the SDK's usual typed error."""
    if isinstance(exc, websockets.InvalidStatus):
        response = exc.response
        try:
            raise_for_error(response.status_code, bytes(response.body or b""))
        except errors.TartarusError as e:
            return e
        return errors.TartarusError(f"the daemon refused the terminal: HTTP {response.status_code}")
    if isinstance(exc, TimeoutError):
        return errors.Timeout(f"opening a terminal at {where} timed out")
    return errors.TartarusError(f"cannot open a terminal at {where}: {exc}")


class _Session:
    """What both twins track: the exit status the server reports before it closes."""

    exit_code: int | None = None
    signal: int | None = None
    exited = False

    def _control(self, text: str) -> None:
        message: dict[str, Any] = json.loads(text)
        if message.get("type") == "exit":
            self.exited = True
            self.exit_code = message.get("exit_code")
            self.signal = message.get("signal")
        elif message.get("type") == "error":
            raise error_from(message)

    def _closed(self) -> bytes:
        if not self.exited:
            raise errors.SandboxFailed("the terminal's connection closed before the command exited")
        return b""

    @staticmethod
    def _resize(rows: int, cols: int) -> str:
        return json.dumps({"type": "resize", "rows": rows, "cols": cols})


class Pty(_Session):
    """A command on a terminal in the sandbox. `send` types, `recv` (or iterating) reads what it
    prints; `wait` returns its exit code; closing (or `kill`) ends it."""

    def __init__(self, request: PtyRequest) -> None:
        where = request.uds or request.uri
        try:
            if request.uds:
                self._ws = sync_client.unix_connect(
                    request.uds,
                    request.uri,
                    additional_headers=request.headers,
                    open_timeout=OPEN_TIMEOUT,
                    close_timeout=CLOSE_TIMEOUT,
                    legacy=True,  # a connection this object owns, not a `with` block
                )
            else:
                self._ws = sync_client.connect(
                    request.uri,
                    additional_headers=request.headers,
                    open_timeout=OPEN_TIMEOUT,
                    close_timeout=CLOSE_TIMEOUT,
                    legacy=True,
                )
        except (OSError, TimeoutError, websockets.InvalidHandshake) as e:
            raise _refused(e, where) from e

    def send(self, data: bytes | str) -> None:
        """Type `data` (a str is UTF-8 encoded; b"\\x03" is ^C)."""
        try:
            self._ws.send(data.encode() if isinstance(data, str) else data, text=False)
        except websockets.ConnectionClosed as e:
            raise errors.SandboxFailed("the terminal is closed") from e

    def recv(self, timeout: float | None = None) -> bytes:
        """The next output bytes; b"" once the command exited. Raises Timeout after `timeout` s."""
        while True:
            try:
                message = self._ws.recv(timeout)
            except TimeoutError as e:
                raise errors.Timeout(f"no terminal output within {timeout} s") from e
            except websockets.ConnectionClosed:
                return self._closed()
            if isinstance(message, bytes):
                return message
            self._control(message)

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.recv():
            yield chunk

    def resize(self, rows: int, cols: int) -> None:
        """Set the terminal's size; the program gets SIGWINCH."""
        try:
            self._ws.send(self._resize(rows, cols))
        except websockets.ConnectionClosed as e:
            raise errors.SandboxFailed("the terminal is closed") from e

    def wait(self, timeout: float | None = None) -> int | None:
        """Read (and drop) output until the command exits; its exit code (None if a signal killed
        it: see `signal`). Raises Timeout if it runs on past `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.recv(None if deadline is None else max(0.0, deadline - time.monotonic())):
            pass
        return self.exit_code

    def kill(self) -> None:
        """End the session; the daemon kills the command (and its foreground job)."""
        self._ws.close()

    close = kill

    def __enter__(self) -> Pty:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPty(_Session):
    """The asyncio twin of `Pty`: `pty = await sb.pty.create()`, `async for chunk in pty`."""

    def __init__(self, ws: aio_client.ClientConnection) -> None:
        self._ws = ws

    @classmethod
    async def open(cls, request: PtyRequest) -> AsyncPty:
        where = request.uds or request.uri
        try:
            if request.uds:
                ws = await aio_client.unix_connect(
                    request.uds,
                    request.uri,
                    additional_headers=request.headers,
                    open_timeout=OPEN_TIMEOUT,
                    close_timeout=CLOSE_TIMEOUT,
                )
            else:
                ws = await aio_client.connect(
                    request.uri,
                    additional_headers=request.headers,
                    open_timeout=OPEN_TIMEOUT,
                    close_timeout=CLOSE_TIMEOUT,
                )
        except (OSError, TimeoutError, websockets.InvalidHandshake) as e:
            raise _refused(e, where) from e
        return cls(ws)

    async def send(self, data: bytes | str) -> None:
        try:
            await self._ws.send(data.encode() if isinstance(data, str) else data, text=False)
        except websockets.ConnectionClosed as e:
            raise errors.SandboxFailed("the terminal is closed") from e

    async def recv(self) -> bytes:
        """The next output bytes; b"" once the command exited (wrap in asyncio.timeout to bound it)."""
        while True:
            try:
                message = await self._ws.recv()
            except websockets.ConnectionClosed:
                return self._closed()
            if isinstance(message, bytes):
                return message
            self._control(message)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.recv():
            yield chunk

    async def resize(self, rows: int, cols: int) -> None:
        try:
            await self._ws.send(self._resize(rows, cols))
        except websockets.ConnectionClosed as e:
            raise errors.SandboxFailed("the terminal is closed") from e

    async def wait(self) -> int | None:
        async for _ in self:
            pass
        return self.exit_code

    async def kill(self) -> None:
        await self._ws.close()

    close = kill

    async def __aenter__(self) -> AsyncPty:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Terminals:
    """`sb.pty`: interactive terminals in a sandbox."""

    def __init__(self, endpoint: Endpoint, sandbox_id: str) -> None:
        self._endpoint = endpoint
        self._sandbox_id = sandbox_id

    def create(
        self,
        *,
        rows: int = 24,
        cols: int = 80,
        cmd: str | Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> Pty:
        """Start `cmd` (default: bash, else sh) on a new terminal of `rows` x `cols`."""
        request = PtyRequest.of(
            self._endpoint, self._sandbox_id, rows=rows, cols=cols, cmd=cmd, env=env, cwd=cwd, user=user
        )
        return Pty(request)


class AsyncTerminals:
    def __init__(self, endpoint: Endpoint, sandbox_id: str) -> None:
        self._endpoint = endpoint
        self._sandbox_id = sandbox_id

    async def create(
        self,
        *,
        rows: int = 24,
        cols: int = 80,
        cmd: str | Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> AsyncPty:
        request = PtyRequest.of(
            self._endpoint, self._sandbox_id, rows=rows, cols=cols, cmd=cmd, env=env, cwd=cwd, user=user
        )
        return await AsyncPty.open(request)
