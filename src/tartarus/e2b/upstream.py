"""Tartarus's own REST API (/v1), as the E2B layer calls it: over the daemon's socket, with a key.

The control plane calls with the caller's key (E2B's `X-API-KEY`), so the daemon authenticates, scopes
and audits the call as the caller's. envd requests carry no API key, only the sandbox's access token,
which is the daemon's own credential scoped to that sandbox (daemon/scoped.py, minted by `tokens`): the
data-plane calls are made with the credential the request presented (`bound`), so the daemon, not this
layer, decides what it opens. The layer holds no key of its own.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tartarus.wire import CodeContext, Execution, SandboxMetrics, context_of, execution_of

TIMEOUT = httpx.Timeout(600, connect=10)  # a cold create under emulation takes minutes
STREAM_TIMEOUT = httpx.Timeout(None, connect=10)  # a command's output may pause for as long as it likes


@dataclass(eq=False)  # not frozen: frameworks set an exception's __traceback__
class UpstreamError(Exception):
    """The daemon's refusal: its status and `{"error": {"code", "message"}}`."""

    status: int
    code: str
    message: str
    errno: int | None = None


@dataclass(frozen=True)
class SandboxTokens:
    """/v1's credentials scoped to one sandbox: E2B's access token (`data`) and traffic token (`code`)."""

    data: str
    code: str


@dataclass(frozen=True)
class SandboxView:
    id: str
    template: str
    state: str  # running, hibernated, failed, destroyed, lost
    created_at: float
    vcpus: int
    memory_mib: int
    tenant: str | None = None
    expires_at: float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> SandboxView:
        return cls(
            id=str(body["id"]),
            template=str(body["template"]),
            state=str(body["state"]),
            created_at=float(body["created_at"]),
            vcpus=int(body["vcpus"]),
            memory_mib=int(body["memory_mib"]),
            tenant=body.get("tenant"),
            expires_at=body.get("expires_at"),
            labels=dict(body.get("labels") or {}),
        )


@dataclass(frozen=True)
class FileView:
    name: str
    type: str  # file, dir, symlink, other
    mode: int  # permission bits
    size: int
    mtime_ns: int
    uid: int
    gid: int
    link: str | None = None

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> FileView:
        return cls(
            name=str(body["name"]),
            type=str(body["type"]),
            mode=int(body["mode"]),
            size=int(body["size"]),
            mtime_ns=int(body["mtime_ns"]),
            uid=int(body["uid"]),
            gid=int(body["gid"]),
            link=body.get("link"),
        )


@dataclass(frozen=True)
class ExecEvent:
    """One line of /v1 exec's NDJSON stream."""

    type: str  # started, stdout, stderr, exit, error
    pid: int | None = None
    data: bytes = b""
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    code: str | None = None
    message: str | None = None
    errno: int | None = None

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> ExecEvent:
        return cls(
            type=str(body["type"]),
            pid=body.get("pid"),
            data=base64.b64decode(body["data"]) if body.get("data") else b"",
            exit_code=body.get("exit_code"),
            signal=body.get("signal"),
            timed_out=bool(body.get("timed_out")),
            code=body.get("code"),
            message=body.get("message"),
            errno=body.get("errno"),
        )


@dataclass(frozen=True)
class ProcessView:
    """A running command, as /v1 lists it."""

    pid: int
    argv: list[str]
    cwd: str | None
    pty: bool = False

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> ProcessView:
        return cls(
            pid=int(body["pid"]),
            argv=[str(a) for a in body["argv"]],
            cwd=body.get("cwd"),
            pty=bool(body.get("pty")),
        )


@dataclass(frozen=True)
class WatchChange:
    """One line of /v1's watch stream: a change (create, write, remove, rename, chmod), `overflow`
    (changes were lost), `started` or `error`."""

    type: str
    name: str = ""
    is_dir: bool = False
    code: str | None = None
    message: str | None = None
    errno: int | None = None

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> WatchChange:
        return cls(
            type=str(body["type"]),
            name=str(body.get("name") or ""),
            is_dir=bool(body.get("is_dir")),
            code=body.get("code"),
            message=body.get("message"),
            errno=body.get("errno"),
        )


@dataclass(frozen=True)
class TermSize:
    rows: int
    cols: int


@dataclass(frozen=True)
class ExecSpec:
    argv: list[str]
    env: Mapping[str, str]
    cwd: str | None
    user: str | None
    timeout: float | None
    pty: TermSize | None = None


def _exec_body(spec: ExecSpec) -> dict[str, Any]:
    body: dict[str, Any] = {"argv": spec.argv, "env": dict(spec.env)}
    for name, value in (("cwd", spec.cwd), ("user", spec.user), ("timeout", spec.timeout)):
        if value is not None:
            body[name] = value
    if spec.pty is not None:
        body["pty"] = {"rows": spec.pty.rows, "cols": spec.pty.cols}
    return body


async def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    await response.aread()
    try:
        error = response.json()["error"]
        code, message, errno_ = str(error["code"]), str(error["message"]), error.get("errno")
    except (ValueError, KeyError, TypeError):
        code, message, errno_ = "http_error", response.text[:500], None
    raise UpstreamError(response.status_code, code, message, errno_)


class Upstream:
    """One connection pool to the daemon, at `url` (TCP) or over the unix socket `uds`."""

    def __init__(
        self,
        *,
        url: str | None = None,
        uds: Path | None = None,
        transport: httpx.AsyncBaseTransport | None = None,  # unit tests: a stand-in daemon
    ) -> None:
        if (url is None) == (uds is None):
            raise ValueError("give the daemon's url or its unix socket, not both")
        transport = transport or (
            httpx.AsyncHTTPTransport(uds=str(uds)) if uds else httpx.AsyncHTTPTransport()
        )
        self._http = httpx.AsyncClient(
            base_url=url or "http://tartarus", transport=transport, timeout=TIMEOUT
        )
        self._key: str | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    def bound(self, credential: str) -> Upstream:
        """This connection pool, making its data-plane calls with `credential` (a request's sandbox-
        scoped one); the control-plane calls take the caller's key each."""
        view = copy.copy(self)
        view._key = credential
        return view

    @property
    def key(self) -> str:
        if self._key is None:
            raise RuntimeError("a data-plane call needs the request's credential: use bound()")
        return self._key

    async def _call(
        self, key: str, method: str, path: str, *, json_body: object = None, params: object = None
    ) -> Any:
        response = await self._http.request(
            method,
            path,
            json=json_body,
            params=params,  # type: ignore[arg-type]
            headers={"Authorization": f"Bearer {key}"},
        )
        await _raise_for(response)
        return response.json() if response.status_code != 204 else None

    # ---- sandboxes ------------------------------------------------------------------------------

    async def create(self, key: str, body: Mapping[str, Any]) -> SandboxView:
        return SandboxView.of(await self._call(key, "POST", "/v1/sandboxes", json_body=body))

    async def tokens(self, key: str, sandbox_id: str) -> SandboxTokens:
        """The sandbox's scoped credentials, for a caller whose `key` may touch it."""
        body = await self._call(key, "POST", f"/v1/sandboxes/{sandbox_id}/tokens")
        return SandboxTokens(data=str(body["data"]), code=str(body["code"]))

    async def get(self, key: str, sandbox_id: str) -> SandboxView:
        return SandboxView.of(await self._call(key, "GET", f"/v1/sandboxes/{sandbox_id}"))

    async def metrics(self, key: str, sandbox_id: str) -> SandboxMetrics | None:
        """/v1's metrics of a running sandbox; None for one that is not running (nothing to measure)."""
        try:
            body = await self._call(key, "GET", f"/v1/sandboxes/{sandbox_id}/metrics")
        except UpstreamError as e:
            if e.status == 409:
                return None
            raise
        return SandboxMetrics(**{f.name: body[f.name] for f in dataclasses.fields(SandboxMetrics)})

    async def list_sandboxes(self, key: str, labels: Mapping[str, str]) -> list[SandboxView]:
        params = [("label", f"{k}={v}") for k, v in labels.items()]
        body = await self._call(key, "GET", "/v1/sandboxes", params=params)
        return [SandboxView.of(s) for s in body["sandboxes"]]

    async def delete(self, key: str, sandbox_id: str) -> None:
        await self._call(key, "DELETE", f"/v1/sandboxes/{sandbox_id}")

    async def set_timeout(self, key: str, sandbox_id: str, timeout: float) -> SandboxView:
        body = await self._call(
            key, "PUT", f"/v1/sandboxes/{sandbox_id}/timeout", json_body={"timeout": timeout}
        )
        return SandboxView.of(body)

    async def fork(self, key: str, sandbox_id: str, count: int) -> list[SandboxView]:
        body = await self._call(key, "POST", f"/v1/sandboxes/{sandbox_id}/fork", json_body={"count": count})
        return [SandboxView.of(s) for s in body["sandboxes"]]

    async def hibernate(self, key: str, sandbox_id: str) -> SandboxView:
        return SandboxView.of(await self._call(key, "POST", f"/v1/sandboxes/{sandbox_id}/hibernate"))

    async def wake(self, key: str, sandbox_id: str) -> SandboxView:
        return SandboxView.of(await self._call(key, "POST", f"/v1/sandboxes/{sandbox_id}/wake"))

    # ---- one sandbox's insides (the data plane) -------------------------------------------------

    async def exec(self, sandbox_id: str, spec: ExecSpec) -> AsyncGenerator[ExecEvent, None]:
        """The command's events; leaving the iteration early closes the stream (the daemon kills it)."""
        async for event in self._events("POST", f"/v1/sandboxes/{sandbox_id}/exec", _exec_body(spec)):
            yield event

    async def start_process(
        self, sandbox_id: str, spec: ExecSpec, *, stdin: bool
    ) -> AsyncGenerator[ExecEvent, None]:
        """A background command's events: leaving the iteration early leaves it running."""
        body = {**_exec_body(spec), "stdin": stdin}
        async for event in self._events("POST", f"/v1/sandboxes/{sandbox_id}/processes", body):
            yield event

    async def attach(self, sandbox_id: str, pid: int) -> AsyncGenerator[ExecEvent, None]:
        """A running command's events from now on (its stream passes from whoever followed it)."""
        async for event in self._events("GET", f"/v1/sandboxes/{sandbox_id}/processes/{pid}/stream"):
            yield event

    async def processes(self, sandbox_id: str) -> list[ProcessView]:
        body = await self._call(self.key, "GET", f"/v1/sandboxes/{sandbox_id}/processes")
        return [ProcessView.of(p) for p in body["processes"]]

    async def send_input(self, sandbox_id: str, pid: int, data: bytes, *, close: bool) -> None:
        await self._call(
            self.key,
            "POST",
            f"/v1/sandboxes/{sandbox_id}/processes/{pid}/stdin",
            json_body={"data": base64.b64encode(data).decode(), "close": close},
        )

    async def signal(self, sandbox_id: str, pid: int, signum: int) -> None:
        await self._call(
            self.key,
            "POST",
            f"/v1/sandboxes/{sandbox_id}/processes/{pid}/signal",
            json_body={"signal": signum},
        )

    async def resize(self, sandbox_id: str, pid: int, size: TermSize) -> None:
        await self._call(
            self.key,
            "POST",
            f"/v1/sandboxes/{sandbox_id}/processes/{pid}/resize",
            json_body={"rows": size.rows, "cols": size.cols},
        )

    async def watch(
        self, sandbox_id: str, path: str, *, recursive: bool
    ) -> AsyncGenerator[WatchChange, None]:
        """A directory's changes (`started` first); leaving the iteration ends the watch."""
        params = {"path": path, "recursive": "true" if recursive else "false"}
        async for line in self._lines("GET", f"/v1/sandboxes/{sandbox_id}/files/watch", params=params):
            yield WatchChange.of(line)

    async def _events(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> AsyncGenerator[ExecEvent, None]:
        async for line in self._lines(method, path, body):
            yield ExecEvent.of(line)

    async def _lines(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[Mapping[str, Any], None]:
        request = self._http.build_request(
            method,
            path,
            json=body,
            params=params,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=STREAM_TIMEOUT,
        )
        response = await self._http.send(request, stream=True)
        try:
            await _raise_for(response)
            async for line in response.aiter_lines():
                if line:
                    yield json.loads(line)
        finally:
            await response.aclose()

    async def read_file(self, sandbox_id: str, path: str) -> httpx.Response:
        """The open download (its body not yet read): the caller streams it on and closes it."""
        request = self._http.build_request(
            "GET",
            f"/v1/sandboxes/{sandbox_id}/files",
            params={"path": path},
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=STREAM_TIMEOUT,
        )
        response = await self._http.send(request, stream=True)
        try:
            await _raise_for(response)
        except BaseException:
            await response.aclose()
            raise
        return response

    async def write_file(self, sandbox_id: str, path: str, content: AsyncIterator[bytes]) -> int:
        response = await self._http.put(
            f"/v1/sandboxes/{sandbox_id}/files",
            params={"path": path},
            content=content,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=STREAM_TIMEOUT,
        )
        await _raise_for(response)
        return int(response.json()["size"])

    async def stat(self, sandbox_id: str, path: str) -> FileView:
        body = await self._call(
            self.key, "GET", f"/v1/sandboxes/{sandbox_id}/files/stat", params={"path": path}
        )
        return FileView.of(body)

    async def list_dir(self, sandbox_id: str, path: str) -> list[FileView]:
        body = await self._call(
            self.key, "GET", f"/v1/sandboxes/{sandbox_id}/files/list", params={"path": path}
        )
        return [FileView.of(e) for e in body["entries"]]

    async def mkdir(self, sandbox_id: str, path: str) -> None:
        await self._call(
            self.key,
            "POST",
            f"/v1/sandboxes/{sandbox_id}/files/mkdir",
            json_body={"path": path, "parents": True},
        )

    async def rename(self, sandbox_id: str, path: str, new_path: str) -> None:
        await self._call(
            self.key,
            "POST",
            f"/v1/sandboxes/{sandbox_id}/files/rename",
            json_body={"path": path, "new_path": new_path},
        )

    async def remove(self, sandbox_id: str, path: str) -> None:
        await self._call(
            self.key,
            "DELETE",
            f"/v1/sandboxes/{sandbox_id}/files",
            params={"path": path, "recursive": "true"},
        )

    # ---- the warm code interpreter --------------------------------------------------------------

    async def run_code(
        self, sandbox_id: str, code: str, *, context: str | None, env: Mapping[str, str] | None
    ) -> Execution:
        body: dict[str, Any] = {"code": code}
        if context is not None:
            body["context"] = context
        if env:
            body["env"] = dict(env)
        response = await self._http.post(
            f"/v1/sandboxes/{sandbox_id}/code",
            json=body,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=STREAM_TIMEOUT,  # a cell may run for as long as it likes
        )
        await _raise_for(response)
        return execution_of(response.json())

    async def create_context(self, sandbox_id: str, cwd: str | None) -> CodeContext:
        body = {"cwd": cwd} if cwd else {}
        path = f"/v1/sandboxes/{sandbox_id}/code/contexts"
        return context_of(await self._call(self.key, "POST", path, json_body=body))

    async def contexts(self, sandbox_id: str) -> list[CodeContext]:
        body = await self._call(self.key, "GET", f"/v1/sandboxes/{sandbox_id}/code/contexts")
        return [context_of(c) for c in body["contexts"]]

    async def restart_context(self, sandbox_id: str, context_id: str) -> CodeContext:
        path = f"/v1/sandboxes/{sandbox_id}/code/contexts/{context_id}/restart"
        return context_of(await self._call(self.key, "POST", path))

    async def delete_context(self, sandbox_id: str, context_id: str) -> None:
        path = f"/v1/sandboxes/{sandbox_id}/code/contexts/{context_id}"
        await self._call(self.key, "DELETE", path)
