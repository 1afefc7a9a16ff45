"""The asynchronous twin of the SDK: `async with await AsyncSandbox.create("python-ds") as sb: ...`."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import httpx

from tartarus import errors
from tartarus.errors import GuestError, NotFound
from tartarus.sdk._autostart import url_for_create
from tartarus.sdk._core import (
    DEFAULT_TIMEOUT,
    CommandResult,
    Endpoint,
    ExecCollector,
    OutputCallback,
    call_timeout,
    code_body,
    create_request,
    exec_body,
    list_files_params,
    list_params,
    process_body,
    raise_for_error,
    resolve_endpoint,
    stdin_body,
    transport_error,
    watch_event,
)
from tartarus.sdk.results import (
    CheckpointInfo,
    ExposedPort,
    FileInfo,
    FileList,
    ProcessInfo,
    SandboxInfo,
    WatchEvent,
    execution_from_json,
    metrics_from_json,
    processes_from_json,
)
from tartarus.sdk.terminal import AsyncTerminals
from tartarus.wire import Execution, SandboxMetrics


class AsyncClient:
    def __init__(self, url: str | None = None, api_key: str | None = None) -> None:
        self.endpoint: Endpoint = resolve_endpoint(url, api_key)
        transport = httpx.AsyncHTTPTransport(uds=self.endpoint.uds) if self.endpoint.uds else None
        self._http = httpx.AsyncClient(
            base_url=self.endpoint.base_url,
            transport=transport,
            headers=self.endpoint.headers(),
            timeout=DEFAULT_TIMEOUT,
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise transport_error(e, self.endpoint) from e
        raise_for_error(response.status_code, response.content)
        return response

    async def stream_lines(self, method: str, path: str, **kwargs: Any) -> AsyncGenerator[str, None]:
        try:
            async with self._http.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    raise_for_error(response.status_code, await response.aread())
                async for line in response.aiter_lines():
                    yield line
        except httpx.HTTPError as e:
            raise transport_error(e, self.endpoint) from e

    async def stream_bytes(self, path: str, **kwargs: Any) -> AsyncIterator[bytes]:
        try:
            async with self._http.stream("GET", path, **kwargs) as response:
                if response.status_code >= 400:
                    raise_for_error(response.status_code, await response.aread())
                async for chunk in response.aiter_bytes():
                    yield chunk
        except httpx.HTTPError as e:
            raise transport_error(e, self.endpoint) from e


class AsyncCommands:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult:
        body = exec_body(cmd, env=env, cwd=cwd, user=user, timeout=timeout, stdin=stdin)
        collector = ExecCollector(on_stdout, on_stderr)
        http_timeout = call_timeout(timeout)
        async for line in self._sb._client.stream_lines(
            "POST", f"/v1/sandboxes/{self._sb.id}/exec", json=body, timeout=http_timeout
        ):
            collector.feed(line.encode())
        return collector.finish()

    async def start(
        self,
        cmd: str | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: bool = False,
    ) -> AsyncCommandHandle:
        """Start a background command: it outlives its handle (`disconnect`) and this client. With
        `stdin` its stdin stays open for `send_stdin`; `timeout` kills it after that many seconds."""
        body = process_body(cmd, env=env, cwd=cwd, user=user, timeout=timeout, stdin=stdin)
        lines = self._sb._client.stream_lines(
            "POST", f"/v1/sandboxes/{self._sb.id}/processes", json=body, timeout=call_timeout(None)
        )
        return await AsyncCommandHandle.open(self, lines)

    async def connect(self, pid: int) -> AsyncCommandHandle:
        """Follow a running command by its guest pid: its output from now on and its exit. A stream
        that followed it already ends (one per command)."""
        lines = self._sb._client.stream_lines(
            "GET", f"/v1/sandboxes/{self._sb.id}/processes/{pid}/stream", timeout=call_timeout(None)
        )
        return await AsyncCommandHandle.open(self, lines)

    async def list(self) -> tuple[ProcessInfo, ...]:
        """The commands running in the sandbox that clients started."""
        response = await self._sb._client.request("GET", f"/v1/sandboxes/{self._sb.id}/processes")
        return processes_from_json(response.json())

    async def send_stdin(self, pid: int, data: bytes | str, *, close: bool = False) -> None:
        """Write to a running command's stdin (it must have been started with `stdin=True`)."""
        await self._sb._client.request(
            "POST", f"/v1/sandboxes/{self._sb.id}/processes/{pid}/stdin", json=stdin_body(data, close)
        )

    async def close_stdin(self, pid: int) -> None:
        """Close its stdin: the command reads end of file."""
        await self.send_stdin(pid, b"", close=True)

    async def signal(self, pid: int, signum: int | str = "SIGTERM") -> None:
        await self._sb._client.request(
            "POST", f"/v1/sandboxes/{self._sb.id}/processes/{pid}/signal", json={"signal": signum}
        )

    async def kill(self, pid: int) -> None:
        await self.signal(pid, "SIGKILL")


async def _aclose(lines: AsyncIterator[str]) -> None:
    close = getattr(lines, "aclose", None)  # `stream_lines` is an async generator: this ends its request
    if close is not None:
        await close()


class AsyncCommandHandle:
    """A running command's stream (`commands.start`, `commands.connect`): `wait` for its result, or
    `disconnect` and let a background command run on (`commands.connect(pid)` follows it again)."""

    def __init__(self, commands: AsyncCommands, lines: AsyncIterator[str], collector: ExecCollector) -> None:
        self._commands = commands
        self._lines = lines
        self._collector = collector
        assert collector.pid is not None
        self.pid: int = collector.pid

    @classmethod
    async def open(cls, commands: AsyncCommands, lines: AsyncIterator[str]) -> AsyncCommandHandle:
        collector = ExecCollector()
        try:
            async for line in lines:  # the `started` event, with the pid, comes first
                collector.feed(line.encode())
                if collector.pid is not None:
                    return cls(commands, lines, collector)
        except BaseException:
            await _aclose(lines)
            raise
        raise errors.SandboxFailed("the command's stream ended before it started")

    async def wait(
        self, on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None
    ) -> CommandResult:
        """Its output from now on, and its exit (whatever the exit code: see `CommandResult.ok`)."""
        self._collector.on_stdout, self._collector.on_stderr = on_stdout, on_stderr
        try:
            async for line in self._lines:
                self._collector.feed(line.encode())
        finally:
            await self.disconnect()
        return self._collector.finish()

    async def disconnect(self) -> None:
        """Stop following it; a background command runs on."""
        await _aclose(self._lines)

    async def send_stdin(self, data: bytes | str) -> None:
        await self._commands.send_stdin(self.pid, data)

    async def close_stdin(self) -> None:
        await self._commands.close_stdin(self.pid)

    async def kill(self) -> None:
        await self._commands.kill(self.pid)


class AsyncFiles:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    @property
    def _base(self) -> str:
        return f"/v1/sandboxes/{self._sb.id}/files"

    async def write(self, path: str, data: bytes | str | AsyncIterable[bytes], *, mode: int = 0o644) -> int:
        content = data.encode() if isinstance(data, str) else data
        response = await self._sb._client.request(
            "PUT", self._base, params={"path": path, "mode": mode}, content=content
        )
        return int(response.json()["size"])

    async def read(self, path: str) -> bytes:
        return b"".join([chunk async for chunk in self.read_stream(path)])

    def read_stream(self, path: str) -> AsyncIterator[bytes]:
        return self._sb._client.stream_bytes(self._base, params={"path": path})

    async def list(self, path: str, *, limit: int | None = None) -> FileList:
        """A directory's entries by name: at most `limit` (else the daemon's cap), `truncated` if more."""
        params = list_files_params(path, limit)
        response = await self._sb._client.request("GET", f"{self._base}/list", params=params)
        return FileList.from_json(response.json())

    async def stat(self, path: str) -> FileInfo:
        response = await self._sb._client.request("GET", f"{self._base}/stat", params={"path": path})
        return FileInfo.from_json(response.json())

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except GuestError as e:
            if e.errno == 2 or "No such file" in e.message:
                return False
            raise
        return True

    async def make_dir(self, path: str, *, parents: bool = True) -> None:
        await self._sb._client.request("POST", f"{self._base}/mkdir", json={"path": path, "parents": parents})

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._sb._client.request("DELETE", self._base, params={"path": path, "recursive": recursive})

    async def rename(self, path: str, new_path: str) -> None:
        await self._sb._client.request(
            "POST", f"{self._base}/rename", json={"path": path, "new_path": new_path}
        )

    async def watch(self, path: str, *, recursive: bool = False) -> AsyncWatcher:
        """Watch a directory (inotify in the guest), `recursive`ly if asked: in place when this returns,
        so changes made after it are seen. Iterate the watcher (`async for`) for its WatchEvents until
        the directory goes away; `aclose()` it (or use `async with`) to stop. A reader slower than the
        changes loses some: an `overflow` event says where. The sandbox stays awake while watched."""
        lines = self._sb._client.stream_lines(
            "GET",
            f"{self._base}/watch",
            params={"path": path, "recursive": recursive},
            timeout=call_timeout(None),
        )
        async for line in lines:  # the `started` line: the guest watches from now on
            if line.strip():
                if watch_event(line) is not None:
                    await lines.aclose()
                    raise errors.TartarusError("the watch stream did not begin with `started`")
                break
        return AsyncWatcher(lines)


class AsyncWatcher:
    """A directory being watched (`files.watch`): `async for` its WatchEvents."""

    def __init__(self, lines: AsyncGenerator[str, None]) -> None:
        self._lines = lines

    async def __aiter__(self) -> AsyncIterator[WatchEvent]:
        async for line in self._lines:
            event = watch_event(line)
            if event is not None:
                yield event

    async def aclose(self) -> None:
        """Stop watching (the guest closes its inotify instance)."""
        await self._lines.aclose()

    async def __aenter__(self) -> AsyncWatcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncSandbox:
    def __init__(self, info: SandboxInfo, client: AsyncClient, *, owns_client: bool = False) -> None:
        self.info = info  # as of the last call that returned it (`refresh` asks again)
        self.id: str = info.id
        self._client = client
        self._owns_client = owns_client
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self.pty = AsyncTerminals(client.endpoint, self.id)
        self.traffic_token: str | None = None  # set by `expose(secure=True)`

    @classmethod
    async def create(
        cls,
        template: str = "python-ds",
        *,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        env: dict[str, str] | None = None,
        network: str | dict[str, Any] | None = None,
        timeout: float | None = None,
        max_processes: int | None = None,
        disk_mib: int | None = None,
        labels: dict[str, str] | None = None,
        backend: str | None = None,
        from_snapshot: str | None = None,
        idle_timeout: float | None = None,
        url: str | None = None,
        api_key: str | None = None,
        client: AsyncClient | None = None,
    ) -> AsyncSandbox:
        """Create a sandbox; `timeout` (seconds) destroys it then unless extended with `set_timeout`."""
        owns = client is None
        if client is None:  # no daemon: starts one (blocking, so off the event loop)
            client = AsyncClient(await asyncio.to_thread(url_for_create, url), api_key)
        path, body = create_request(
            template,
            from_snapshot=from_snapshot,
            vcpus=vcpus,
            memory_mib=memory_mib,
            env=env,
            idle_timeout=idle_timeout,
            network=network,
            timeout=timeout,
            max_processes=max_processes,
            disk_mib=disk_mib,
            labels=labels,
            backend=backend,
        )
        try:
            info = SandboxInfo.from_json((await client.request("POST", path, json=body)).json())
        except BaseException:
            if owns:
                await client.close()
            raise
        return cls(info, client, owns_client=owns)

    @classmethod
    async def connect(
        cls, sandbox_id: str, *, url: str | None = None, api_key: str | None = None
    ) -> AsyncSandbox:
        client = AsyncClient(url, api_key)
        try:
            info = SandboxInfo.from_json((await client.request("GET", f"/v1/sandboxes/{sandbox_id}")).json())
        except BaseException:
            await client.close()
            raise
        return cls(info, client, owns_client=True)

    @staticmethod
    async def list(
        *,
        labels: dict[str, str] | None = None,
        include_ended: bool = False,
        url: str | None = None,
        api_key: str | None = None,
    ) -> builtins.list[SandboxInfo]:
        """Your sandboxes (all of them, for an admin key), those with all of `labels` if given."""
        client = AsyncClient(url, api_key)
        try:
            params = list_params(labels, include_ended)
            response = await client.request("GET", "/v1/sandboxes", params=params)
            return SandboxInfo.list_from_json(response.json())
        finally:
            await client.close()

    async def set_timeout(self, timeout: float | None) -> SandboxInfo:
        """Destroy the sandbox `timeout` seconds from now, up to the policy's `max_ttl_s`
        (InvalidArgument over it, and for None: never, which no cap admits)."""
        return await self._update("PUT", "timeout", json={"timeout": timeout})

    async def run_code(self, code: str, *, timeout: float | None = None) -> Execution:
        """Run Python in the sandbox's warm interpreter (numpy, pandas, matplotlib preloaded); state
        persists. The last expression's value and the figures shown come back in `results`, rich
        (a DataFrame's `html`, a figure's `png`, base64), and as `result`, its repr."""
        http_timeout = call_timeout(timeout)
        response = await self._client.request(
            "POST", f"/v1/sandboxes/{self.id}/code", json=code_body(code, timeout), timeout=http_timeout
        )
        return execution_from_json(response.json())

    async def hibernate(self) -> SandboxInfo:
        """Put the sandbox to disk (no process, no RAM); any later call wakes it as it was."""
        return await self._update("POST", "hibernate")

    async def wake(self) -> SandboxInfo:
        return await self._update("POST", "wake")

    async def snapshot(self, *, ttl: float | None = None) -> CheckpointInfo:
        """A checkpoint of the running sandbox; `AsyncSandbox.create(from_snapshot=checkpoint.id)`."""
        body = {"ttl_s": ttl} if ttl else {}
        path = f"/v1/sandboxes/{self.id}/checkpoints"
        return CheckpointInfo.from_json((await self._client.request("POST", path, json=body)).json())

    async def fork(self, count: int = 1) -> builtins.list[AsyncSandbox]:
        """`count` running copies of this sandbox: memory, processes and files as they are now."""
        path = f"/v1/sandboxes/{self.id}/fork"
        answer = (await self._client.request("POST", path, json={"count": count})).json()
        return [AsyncSandbox(info, self._client) for info in SandboxInfo.list_from_json(answer)]

    async def refresh(self) -> SandboxInfo:
        """Ask the daemon for this sandbox's state now (`info` is as of the last call)."""
        return await self._update("GET")

    async def metrics(self) -> SandboxMetrics:
        """What the sandbox uses now (see `Sandbox.metrics`)."""
        return metrics_from_json(
            (await self._client.request("GET", f"/v1/sandboxes/{self.id}/metrics")).json()
        )

    async def expose(self, port: int, *, secure: bool = False) -> ExposedPort:
        """Expose `port` of the guest on the daemon's host (see `Sandbox.expose`)."""
        body = {"port": port, "secure": secure}
        path = f"/v1/sandboxes/{self.id}/ports"
        exposed = ExposedPort.from_json((await self._client.request("POST", path, json=body)).json())
        if exposed.traffic_token:
            self.traffic_token = exposed.traffic_token
        return exposed

    async def get_host(self, port: int, *, secure: bool = False) -> str:
        """`host:port` on the daemon's host that forwards TCP to `port` in the guest (see `expose`)."""
        return (await self.expose(port, secure=secure)).address

    async def unexpose(self, port: int) -> None:
        """Stop forwarding `port` (its connections end)."""
        await self._client.request("DELETE", f"/v1/sandboxes/{self.id}/ports/{port}")

    async def quarantine(self, reason: str) -> SandboxInfo:
        """Operator action: cut this sandbox's network now and clamp its CPU and memory (no restart)."""
        return await self._update("POST", "quarantine", json={"reason": reason})

    async def release(self) -> SandboxInfo:
        """Operator action: end the quarantine."""
        return await self._update("POST", "release")

    async def _update(self, method: str, verb: str | None = None, **kwargs: Any) -> SandboxInfo:
        """Call a route that answers with this sandbox's description, and keep it as `info`."""
        path = f"/v1/sandboxes/{self.id}" + (f"/{verb}" if verb else "")
        self.info = SandboxInfo.from_json((await self._client.request(method, path, **kwargs)).json())
        return self.info

    async def kill(self) -> None:
        try:
            await self._client.request("DELETE", f"/v1/sandboxes/{self.id}")
        except NotFound:
            pass
        finally:
            if self._owns_client:
                await self._client.close()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.kill()
