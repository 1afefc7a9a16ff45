"""The synchronous SDK: `with Sandbox.create("python-ds") as sb: sb.commands.run("...")`."""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

import httpx

from tartarus import errors
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
from tartarus.sdk.terminal import Terminals
from tartarus.wire import Execution, SandboxMetrics


class Client:
    """A connection to a Tartarus daemon (local socket or remote URL)."""

    def __init__(self, url: str | None = None, api_key: str | None = None) -> None:
        self.endpoint: Endpoint = resolve_endpoint(url, api_key)
        transport = httpx.HTTPTransport(uds=self.endpoint.uds) if self.endpoint.uds else None
        self._http = httpx.Client(
            base_url=self.endpoint.base_url,
            transport=transport,
            headers=self.endpoint.headers(),
            timeout=DEFAULT_TIMEOUT,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise transport_error(e, self.endpoint) from e
        raise_for_error(response.status_code, response.content)
        return response

    def stream_lines(self, method: str, path: str, **kwargs: Any) -> Iterator[bytes]:
        try:
            with self._http.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    raise_for_error(response.status_code, response.read())
                yield from response.iter_lines()  # type: ignore[misc]
        except httpx.HTTPError as e:
            raise transport_error(e, self.endpoint) from e

    def stream_bytes(self, path: str, **kwargs: Any) -> Iterator[bytes]:
        try:
            with self._http.stream("GET", path, **kwargs) as response:
                if response.status_code >= 400:
                    raise_for_error(response.status_code, response.read())
                yield from response.iter_bytes()
        except httpx.HTTPError as e:
            raise transport_error(e, self.endpoint) from e


class Commands:
    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def run(
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
        """Run a command to completion; a string goes through `/bin/sh -c`, a list is the argv."""
        body = exec_body(cmd, env=env, cwd=cwd, user=user, timeout=timeout, stdin=stdin)
        collector = ExecCollector(on_stdout, on_stderr)
        http_timeout = call_timeout(timeout)
        for line in self._sb._client.stream_lines(
            "POST", f"/v1/sandboxes/{self._sb.id}/exec", json=body, timeout=http_timeout
        ):
            collector.feed(line.encode() if isinstance(line, str) else line)
        return collector.finish()

    def start(
        self,
        cmd: str | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: bool = False,
    ) -> CommandHandle:
        """Start a background command: it outlives its handle (`disconnect`) and this client. With
        `stdin` its stdin stays open for `send_stdin`; `timeout` kills it after that many seconds."""
        body = process_body(cmd, env=env, cwd=cwd, user=user, timeout=timeout, stdin=stdin)
        lines = self._sb._client.stream_lines(
            "POST", f"/v1/sandboxes/{self._sb.id}/processes", json=body, timeout=call_timeout(None)
        )
        return CommandHandle(self, lines)

    def connect(self, pid: int) -> CommandHandle:
        """Follow a running command by its guest pid: its output from now on and its exit. A stream
        that followed it already ends (one per command)."""
        lines = self._sb._client.stream_lines(
            "GET", f"/v1/sandboxes/{self._sb.id}/processes/{pid}/stream", timeout=call_timeout(None)
        )
        return CommandHandle(self, lines)

    def list(self) -> tuple[ProcessInfo, ...]:
        """The commands running in the sandbox that clients started."""
        response = self._sb._client.request("GET", f"/v1/sandboxes/{self._sb.id}/processes")
        return processes_from_json(response.json())

    def send_stdin(self, pid: int, data: bytes | str, *, close: bool = False) -> None:
        """Write to a running command's stdin (it must have been started with `stdin=True`)."""
        self._sb._client.request(
            "POST", f"/v1/sandboxes/{self._sb.id}/processes/{pid}/stdin", json=stdin_body(data, close)
        )

    def close_stdin(self, pid: int) -> None:
        """Close its stdin: the command reads end of file."""
        self.send_stdin(pid, b"", close=True)

    def signal(self, pid: int, signum: int | str = "SIGTERM") -> None:
        self._sb._client.request(
            "POST", f"/v1/sandboxes/{self._sb.id}/processes/{pid}/signal", json={"signal": signum}
        )

    def kill(self, pid: int) -> None:
        self.signal(pid, "SIGKILL")


class CommandHandle:
    """A running command's stream (`commands.start`, `commands.connect`): `wait` for its result, or
    `disconnect` and let a background command run on (`commands.connect(pid)` follows it again)."""

    def __init__(self, commands: Commands, lines: Iterator[bytes | str]) -> None:
        self._commands = commands
        self._lines = lines
        self._collector = ExecCollector()
        for line in lines:  # the `started` event, with the pid, comes first
            self._collector.feed(line.encode() if isinstance(line, str) else line)
            if self._collector.pid is not None:
                break
        if self._collector.pid is None:
            raise errors.SandboxFailed("the command's stream ended before it started")
        self.pid: int = self._collector.pid

    def wait(
        self, on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None
    ) -> CommandResult:
        """Its output from now on, and its exit (whatever the exit code: see `CommandResult.ok`)."""
        self._collector.on_stdout, self._collector.on_stderr = on_stdout, on_stderr
        try:
            for line in self._lines:
                self._collector.feed(line.encode() if isinstance(line, str) else line)
        finally:
            self.disconnect()
        return self._collector.finish()

    def disconnect(self) -> None:
        """Stop following it; a background command runs on."""
        close = getattr(self._lines, "close", None)
        if close is not None:
            close()

    def send_stdin(self, data: bytes | str) -> None:
        self._commands.send_stdin(self.pid, data)

    def close_stdin(self) -> None:
        self._commands.close_stdin(self.pid)

    def kill(self) -> None:
        self._commands.kill(self.pid)


class Files:
    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    @property
    def _base(self) -> str:
        return f"/v1/sandboxes/{self._sb.id}/files"

    def write(self, path: str, data: bytes | str | Iterable[bytes], *, mode: int = 0o644) -> int:
        content = data.encode() if isinstance(data, str) else data
        response = self._sb._client.request(
            "PUT", self._base, params={"path": path, "mode": mode}, content=content
        )
        return int(response.json()["size"])

    def read(self, path: str) -> bytes:
        return b"".join(self.read_stream(path))

    def read_text(self, path: str) -> str:
        return self.read(path).decode()

    def read_stream(self, path: str) -> Iterator[bytes]:
        return self._sb._client.stream_bytes(self._base, params={"path": path})

    def list(self, path: str, *, limit: int | None = None) -> FileList:
        """A directory's entries by name: at most `limit` (else the daemon's cap), `truncated` if more."""
        params = list_files_params(path, limit)
        return FileList.from_json(self._sb._client.request("GET", f"{self._base}/list", params=params).json())

    def stat(self, path: str) -> FileInfo:
        response = self._sb._client.request("GET", f"{self._base}/stat", params={"path": path})
        return FileInfo.from_json(response.json())

    def exists(self, path: str) -> bool:
        from tartarus.errors import GuestError

        try:
            self.stat(path)
        except GuestError as e:
            if e.errno == 2 or "No such file" in e.message:
                return False
            raise
        return True

    def make_dir(self, path: str, *, parents: bool = True) -> None:
        self._sb._client.request("POST", f"{self._base}/mkdir", json={"path": path, "parents": parents})

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self._sb._client.request("DELETE", self._base, params={"path": path, "recursive": recursive})

    def rename(self, path: str, new_path: str) -> None:
        self._sb._client.request("POST", f"{self._base}/rename", json={"path": path, "new_path": new_path})

    def watch(self, path: str, *, recursive: bool = False) -> Watcher:
        """Watch a directory (inotify in the guest), `recursive`ly if asked: in place when this returns,
        so changes made after it are seen. Iterate the watcher for its WatchEvents until the directory
        goes away; `close()` it (or use `with`) to stop. A reader slower than the changes loses some:
        an `overflow` event says where. The sandbox stays awake while it is watched."""
        lines = self._sb._client.stream_lines(
            "GET",
            f"{self._base}/watch",
            params={"path": path, "recursive": recursive},
            timeout=call_timeout(None),
        )
        return Watcher(lines)


class Watcher:
    """A directory being watched (`files.watch`): iterate it for WatchEvents."""

    def __init__(self, lines: Iterator[bytes]) -> None:
        self._lines = lines
        for line in lines:  # the `started` line: the guest watches from now on
            if line.strip():
                if watch_event(line) is not None:
                    raise errors.TartarusError("the watch stream did not begin with `started`")
                break

    def __iter__(self) -> Iterator[WatchEvent]:
        for line in self._lines:
            event = watch_event(line)
            if event is not None:
                yield event

    def close(self) -> None:
        """Stop watching (the guest closes its inotify instance)."""
        close = getattr(self._lines, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sandbox:
    """A handle on one sandbox. Use `Sandbox.create(...)` as a context manager to destroy it on exit."""

    def __init__(self, info: SandboxInfo, client: Client, *, owns_client: bool = False) -> None:
        self.info = info  # as of the last call that returned it (`refresh` asks again)
        self.id: str = info.id
        self._client = client
        self._owns_client = owns_client
        self.commands = Commands(self)
        self.files = Files(self)
        self.pty = Terminals(client.endpoint, self.id)
        self.traffic_token: str | None = None  # set by `expose(secure=True)`

    @classmethod
    def create(
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
        client: Client | None = None,
    ) -> Sandbox:
        """Create a sandbox; `timeout` (seconds) destroys it then unless extended with `set_timeout`."""
        owns = client is None
        client = client or Client(url_for_create(url), api_key)  # no daemon: starts one
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
            info = SandboxInfo.from_json(client.request("POST", path, json=body).json())
        except BaseException:
            if owns:
                client.close()
            raise
        return cls(info, client, owns_client=owns)

    @classmethod
    def connect(cls, sandbox_id: str, *, url: str | None = None, api_key: str | None = None) -> Sandbox:
        client = Client(url, api_key)
        try:
            info = SandboxInfo.from_json(client.request("GET", f"/v1/sandboxes/{sandbox_id}").json())
        except BaseException:
            client.close()
            raise
        return cls(info, client, owns_client=True)

    @staticmethod
    def list(
        *,
        labels: dict[str, str] | None = None,
        include_ended: bool = False,
        url: str | None = None,
        api_key: str | None = None,
    ) -> builtins.list[SandboxInfo]:
        """Your sandboxes (all of them, for an admin key), those with all of `labels` if given."""
        client = Client(url, api_key)
        try:
            params = list_params(labels, include_ended)
            return SandboxInfo.list_from_json(client.request("GET", "/v1/sandboxes", params=params).json())
        finally:
            client.close()

    def set_timeout(self, timeout: float | None) -> SandboxInfo:
        """Destroy the sandbox `timeout` seconds from now, up to the policy's `max_ttl_s`
        (InvalidArgument over it, and for None: never, which no cap admits)."""
        return self._update("PUT", "timeout", json={"timeout": timeout})

    def run_code(self, code: str, *, timeout: float | None = None) -> Execution:
        """Run Python in the sandbox's warm interpreter (numpy, pandas, matplotlib preloaded); state
        persists. The last expression's value and the figures shown come back in `results`, rich
        (a DataFrame's `html`, a figure's `png`, base64), and as `result`, its repr."""
        http_timeout = call_timeout(timeout)
        response = self._client.request(
            "POST", f"/v1/sandboxes/{self.id}/code", json=code_body(code, timeout), timeout=http_timeout
        )
        return execution_from_json(response.json())

    def hibernate(self) -> SandboxInfo:
        """Put the sandbox to disk (no process, no RAM); any later call wakes it as it was."""
        return self._update("POST", "hibernate")

    def wake(self) -> SandboxInfo:
        return self._update("POST", "wake")

    def snapshot(self, *, ttl: float | None = None) -> CheckpointInfo:
        """A checkpoint of the running sandbox; `Sandbox.create(from_snapshot=checkpoint.id)`."""
        body = {"ttl_s": ttl} if ttl else {}
        path = f"/v1/sandboxes/{self.id}/checkpoints"
        return CheckpointInfo.from_json(self._client.request("POST", path, json=body).json())

    def fork(self, count: int = 1) -> builtins.list[Sandbox]:
        """`count` running copies of this sandbox: memory, processes and files as they are now."""
        path = f"/v1/sandboxes/{self.id}/fork"
        answer = self._client.request("POST", path, json={"count": count}).json()
        return [Sandbox(info, self._client) for info in SandboxInfo.list_from_json(answer)]

    def refresh(self) -> SandboxInfo:
        """Ask the daemon for this sandbox's state now (`info` is as of the last call)."""
        return self._update("GET")

    def metrics(self) -> SandboxMetrics:
        """What the sandbox uses now: CPU (percent of its vCPUs since the previous call), the guest's
        memory and its writable layer's disk. A hibernated sandbox is a `Conflict`, not woken."""
        return metrics_from_json(self._client.request("GET", f"/v1/sandboxes/{self.id}/metrics").json())

    def expose(self, port: int, *, secure: bool = False) -> ExposedPort:
        """Expose `port` of the guest on the daemon's host, at `host:host_port`.
        With `secure`, connections must send `traffic_token` in the `X-Tartarus-Traffic-Token` header of
        their first HTTP/1.x request (else 403); it is also kept in `self.traffic_token`."""
        body = {"port": port, "secure": secure}
        exposed = ExposedPort.from_json(
            self._client.request("POST", f"/v1/sandboxes/{self.id}/ports", json=body).json()
        )
        if exposed.traffic_token:
            self.traffic_token = exposed.traffic_token
        return exposed

    def get_host(self, port: int, *, secure: bool = False) -> str:
        """`host:port` on the daemon's host that forwards TCP to `port` in the guest (see `expose`)."""
        return self.expose(port, secure=secure).address

    def unexpose(self, port: int) -> None:
        """Stop forwarding `port` (its connections end)."""
        self._client.request("DELETE", f"/v1/sandboxes/{self.id}/ports/{port}")

    def quarantine(self, reason: str) -> SandboxInfo:
        """Operator action: cut this sandbox's network now and clamp its CPU and memory (no restart)."""
        return self._update("POST", "quarantine", json={"reason": reason})

    def release(self) -> SandboxInfo:
        """Operator action: end the quarantine."""
        return self._update("POST", "release")

    def _update(self, method: str, verb: str | None = None, **kwargs: Any) -> SandboxInfo:
        """Call a route that answers with this sandbox's description, and keep it as `info`."""
        path = f"/v1/sandboxes/{self.id}" + (f"/{verb}" if verb else "")
        self.info = SandboxInfo.from_json(self._client.request(method, path, **kwargs).json())
        return self.info

    def kill(self) -> None:
        from tartarus.errors import NotFound

        try:
            self._client.request("DELETE", f"/v1/sandboxes/{self.id}")
        except NotFound:
            pass
        finally:
            if self._owns_client:
                self._client.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()
