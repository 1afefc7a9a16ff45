"""What the sync and async SDK share: endpoint resolution, request bodies, response decoding, errors."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tartarus import errors
from tartarus.paths import LOCAL_KEY_FILE
from tartarus.sdk._autostart import local_socket
from tartarus.sdk.results import WatchEvent

OutputCallback = Callable[[bytes], None]


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    uds: str | None = None
    api_key: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def local_key(uds: str) -> str | None:
    """The admin key a local daemon keeps beside its socket, if this user may read it (root may)."""
    try:
        return (Path(uds).parent / LOCAL_KEY_FILE).read_text().strip() or None
    except OSError:
        return None


def resolve_endpoint(url: str | None = None, api_key: str | None = None) -> Endpoint:
    """Explicit argument, then TARTARUS_URL / TARTARUS_API_KEY, then the local daemon's socket (this
    process's embedded daemon's, if `create` started one).

    On a unix socket with no key given, the daemon's local admin key file is used if readable.
    """
    url = url or os.environ.get("TARTARUS_URL")
    api_key = api_key or os.environ.get("TARTARUS_API_KEY")
    if not url or url.startswith("unix://"):
        uds = url.removeprefix("unix://") if url else str(local_socket())
        return Endpoint("http://tartarus", uds=uds, api_key=api_key or local_key(uds))
    if not url.startswith(("http://", "https://")):
        raise errors.InvalidArgument(f"TARTARUS_URL must be http(s):// or unix://, not {url!r}")
    return Endpoint(url.rstrip("/"), api_key=api_key)


def error_from(detail: dict[str, Any]) -> errors.TartarusError:
    """Rebuild the server's exception from an error body (or exec error event)."""
    cls = errors.ALL.get(str(detail.get("code")), errors.TartarusError)
    message = str(detail.get("message", "unknown error"))
    if issubclass(cls, errors.GuestError):
        return cls(message, int(detail.get("errno") or 0))
    return cls(message)


def watch_event(line: bytes | str) -> WatchEvent | None:
    """One line of a watch stream as its event; None for the `started` line (or a blank one); an
    `error` line (the sandbox failed under the watch) raises it."""
    if not line.strip():
        return None
    try:
        data = json.loads(line)
    except ValueError as e:
        raise errors.TartarusError(f"the daemon sent a watch line that is not JSON: {line[:200]!r}") from e
    if isinstance(data, dict) and data.get("type") == "started":
        return None
    if isinstance(data, dict) and data.get("type") == "error":
        raise error_from(data)
    return WatchEvent.from_json(data)


def raise_for_error(status: int, body: bytes) -> None:
    if status < 400:
        return
    try:
        detail = json.loads(body)["error"]
        if not isinstance(detail, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise errors.TartarusError(f"HTTP {status}: {body[:500]!r}") from None
    raise error_from(detail)


def transport_error(exc: httpx.HTTPError, endpoint: Endpoint) -> errors.TartarusError:
    where = endpoint.uds or endpoint.base_url
    if isinstance(exc, httpx.TimeoutException):
        return errors.Timeout(f"request to the Tartarus daemon at {where} timed out")
    return errors.TartarusError(f"cannot reach the Tartarus daemon at {where}: {exc}")


DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)


def call_timeout(timeout: float | None) -> httpx.Timeout:
    """HTTP timeout for a call that may itself run for `timeout` seconds in the guest (None: unbounded)."""
    return httpx.Timeout(None if timeout is None else timeout + 60, connect=10.0)


def argv_of(cmd: str | Sequence[str]) -> list[str]:
    """A string runs through `/bin/sh -c` (like a shell line); a sequence is the exact argv."""
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    argv = list(cmd)
    if not argv:
        raise errors.InvalidArgument("command must not be empty")
    return argv


def exec_body(
    cmd: str | Sequence[str],
    *,
    env: dict[str, str] | None,
    cwd: str | None,
    user: str | None,
    timeout: float | None,
    stdin: bytes | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"argv": argv_of(cmd), "env": env or {}}
    if cwd:
        body["cwd"] = cwd
    if user:
        body["user"] = user
    if timeout:
        body["timeout"] = timeout
    if stdin is not None:
        body["stdin"] = base64.b64encode(stdin).decode()
    return body


def process_body(
    cmd: str | Sequence[str],
    *,
    env: dict[str, str] | None,
    cwd: str | None,
    user: str | None,
    timeout: float | None,
    stdin: bool,
) -> dict[str, Any]:
    body = exec_body(cmd, env=env, cwd=cwd, user=user, timeout=timeout, stdin=None)
    body["stdin"] = stdin
    return body


def stdin_body(data: bytes | str, close: bool) -> dict[str, Any]:
    raw = data.encode() if isinstance(data, str) else data
    return {"data": base64.b64encode(raw).decode(), "close": close}


@dataclass(frozen=True)
class CommandResult:
    """The outcome of `commands.run`: decoded text plus the raw bytes."""

    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    pid: int | None = None

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class ExecCollector:
    """Feeds exec stream lines into a CommandResult, calling the optional output callbacks."""

    on_stdout: OutputCallback | None = None
    on_stderr: OutputCallback | None = None
    _stdout: list[bytes] = field(default_factory=list)
    _stderr: list[bytes] = field(default_factory=list)
    result: CommandResult | None = None
    pid: int | None = None

    def feed(self, line: bytes) -> None:
        if not line.strip():
            return
        event = json.loads(line)
        kind = event["type"]
        if kind == "started":
            self.pid = event.get("pid")
        elif kind in ("stdout", "stderr"):
            data = base64.b64decode(event["data"])
            (self._stdout if kind == "stdout" else self._stderr).append(data)
            callback = self.on_stdout if kind == "stdout" else self.on_stderr
            if callback is not None:
                callback(data)
        elif kind == "exit":
            self.result = CommandResult(
                exit_code=event.get("exit_code"),
                signal=event.get("signal"),
                timed_out=bool(event.get("timed_out")),
                stdout_bytes=b"".join(self._stdout),
                stderr_bytes=b"".join(self._stderr),
                pid=self.pid,
            )
        elif kind == "error":
            raise error_from(event)

    def finish(self) -> CommandResult:
        if self.result is None:
            raise errors.SandboxFailed("exec stream ended without an exit status")
        return self.result


def create_request(
    template: str,
    *,
    from_snapshot: str | None,
    vcpus: int | None,
    memory_mib: int | None,
    env: dict[str, str] | None,
    idle_timeout: float | None,
    network: str | dict[str, Any] | None = None,
    timeout: float | None = None,
    max_processes: int | None = None,
    labels: dict[str, str] | None = None,
    disk_mib: int | None = None,
    backend: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """The path and body that create a sandbox from a template or (from_snapshot) a checkpoint."""
    body: dict[str, Any] = {"env": env or {}}
    if idle_timeout:
        body["idle_timeout_s"] = idle_timeout
    if from_snapshot is not None:
        if (
            vcpus or memory_mib or network is not None or timeout or max_processes or disk_mib or labels
            or backend
        ):  # fmt: skip
            raise errors.InvalidArgument(
                "a sandbox from a checkpoint takes only env and idle_timeout; the rest is the checkpoint's"
            )
        return f"/v1/checkpoints/{from_snapshot}/sandboxes", body
    body["template"] = template
    if vcpus:
        body["vcpus"] = vcpus
    if memory_mib:
        body["memory_mib"] = memory_mib
    if network is not None:
        # "full" / "none", or {"mode": "allow", "allow": [{"host": "pypi.org", "ports": [443]}]}
        body["network"] = {"mode": network} if isinstance(network, str) else network
    if timeout:
        body["timeout"] = timeout
    if max_processes is not None:
        body["max_processes"] = max_processes
    if disk_mib is not None:
        body["disk_mib"] = disk_mib
    if labels:
        body["labels"] = labels
    if backend is not None:  # kvm | tcg | gvisor; None: the template's, the daemon's or the host's
        body["backend"] = backend
    return "/v1/sandboxes", body


def list_params(labels: dict[str, str] | None, include_ended: bool) -> list[tuple[str, str]]:
    params = [("label", f"{k}={v}") for k, v in (labels or {}).items()]
    if include_ended:
        params.append(("include_ended", "true"))
    return params


def list_files_params(path: str, limit: int | None) -> dict[str, str | int]:
    return {"path": path} if limit is None else {"path": path, "limit": limit}


def code_body(code: str, timeout: float | None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code}
    if timeout:
        body["timeout"] = timeout
    return body
