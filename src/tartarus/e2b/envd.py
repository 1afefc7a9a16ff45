"""envd, E2B's in-sandbox daemon, as its SDK calls it: Connect RPCs for processes and the filesystem, and
HTTP for `/files` and `/health`, each mapped onto /v1 calls for the one sandbox the request was routed
to (app.py has checked its access token by then).

Mapped: process.Process/Start (the command as E2B runs it, `/bin/bash -l -c CMD`, streamed: start with
the guest's pid, stdout/stderr, or `pty` output on a terminal, end with the exit status; the stream's
deadline is the command's timeout; a /v1 background process, so ending the stream leaves it running,
as envd does), Connect (follow a running command by pid), List, SendInput (stdin or terminal input),
CloseStdin, SendSignal and Update (a terminal's size) (/v1's processes endpoints),
filesystem.Filesystem Stat/ListDir/MakeDir/Move/Remove, WatchDir and the polled watchers (/v1's watch
stream; watchers.py), `/files` download and upload (multipart or octet-stream). A call that names no
user runs as the template's E2B user (`user` on `base`: layer.py). What needs guest-agent features
Tartarus lacks (streamed input, processes selected by tag) answers Connect's `unimplemented`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import posixpath
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tartarus.e2b import connect
from tartarus.e2b.connect import ConnectError
from tartarus.e2b.layer import Layer, layer_of, upstream_of
from tartarus.e2b.upstream import (
    ExecEvent,
    ExecSpec,
    FileView,
    TermSize,
    Upstream,
    UpstreamError,
    WatchChange,
)
from tartarus.e2b.watchers import fs_event, watch_error

Item = TypeVar("Item")
_ENDED = WatchChange("ended")  # what a finished watch stream gives `anext`
_DONE = ExecEvent("done")  # and a finished command stream

CONNECT_JSON = "application/connect+json"
SANDBOX_GONE = "The sandbox was not found"  # the SDK tells a dead sandbox by "was not found"
UPLOAD_CHUNK = 1 << 20
MAX_DEPTH = 16  # ListDir's depth: each level is one /v1 listing per directory
MAX_LISTED = 10_000  # entries per ListDir answer, however deep
PTY_MAX = 1000  # rows and columns of a terminal, as the guest agent takes them
UNIMPLEMENTED: dict[str, str] = {}
CLIENT_STREAMING = {"process.Process/StreamInput"}
STREAMING = {"process.Process/Start", "process.Process/Connect", "filesystem.Filesystem/WatchDir"}
_ERRNO_CODES = {
    1: "permission_denied",  # EPERM
    2: "not_found",  # ENOENT
    3: "not_found",  # ESRCH: no running command with that pid
    13: "permission_denied",  # EACCES
    16: "aborted",  # EBUSY: another client connected to the command
    17: "already_exists",  # EEXIST
    20: "invalid_argument",  # ENOTDIR
    21: "invalid_argument",  # EISDIR
    22: "invalid_argument",  # EINVAL
    24: "resource_exhausted",  # EMFILE: too many watches at once
    25: "failed_precondition",  # ENOTTY: resizing a command on no terminal
    28: "resource_exhausted",  # ENOSPC
    32: "failed_precondition",  # EPIPE: the command's stdin is closed (or was never opened)
    36: "invalid_argument",  # ENAMETOOLONG
    39: "failed_precondition",  # ENOTEMPTY
}
_UPSTREAM_CODES = {
    400: "invalid_argument",
    401: "unauthenticated",  # the sandbox's token is not the daemon's (forged, or of another daemon)
    403: "permission_denied",
    409: "unavailable",  # the sandbox is busy changing state (hibernating, waking)
    413: "resource_exhausted",
    423: "permission_denied",  # quarantined
    429: "resource_exhausted",
    504: "deadline_exceeded",
    507: "resource_exhausted",
}


class SandboxGone(Exception):
    """The routed sandbox does not exist (any more): answered as E2B's proxy does, 502."""


def sandbox_gone(sandbox_id: str) -> JSONResponse:
    return JSONResponse(
        {"code": 502, "message": f"{SANDBOX_GONE}: {sandbox_id}", "sandboxId": sandbox_id}, 502
    )


def connect_error(e: UpstreamError) -> ConnectError:
    """A /v1 refusal (other than the sandbox being gone) as the Connect error envd would have sent."""
    if e.status == 422 and e.code == "guest_error":
        return ConnectError(_ERRNO_CODES.get(e.errno or 0, "unknown"), e.message)
    if e.status == 502:
        return ConnectError("unavailable", f"{e.message} ({SANDBOX_GONE.lower()} running)")
    return ConnectError(_UPSTREAM_CODES.get(e.status, "internal"), e.message)


def _gone(e: UpstreamError) -> bool:
    return e.status == 404 and e.code == "not_found"


def http_error(error: ConnectError) -> JSONResponse:
    """envd's HTTP endpoints (`/files`) answer `{"code": <status>, "message"}`."""
    return JSONResponse({"code": error.http_status, "message": error.message}, error.http_status)


async def user_of(request: Request, layer: Layer, sid: str) -> str | None:
    """Who an envd call runs as: the user the SDK names, else the template's E2B user."""
    return basic_user(request.headers.get("authorization")) or await layer.default_user(
        upstream_of(request), sid
    )


def basic_user(authorization: str | None) -> str | None:
    """The user an envd call runs as: E2B sends `Authorization: Basic base64("user:")`."""
    if not authorization or not authorization.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as e:
        raise ConnectError("invalid_argument", "the Authorization header is not valid Basic") from e
    return decoded.split(":", 1)[0] or None


def absolute(path: str, user: str | None) -> str:
    """envd resolves a relative path against the user's home; so does this (root's is /root)."""
    if not path:
        raise ConnectError("invalid_argument", "path is required")
    if path.startswith("/"):
        return posixpath.normpath(path) if path != "/" else "/"
    return posixpath.normpath(posixpath.join(home(user), path))


def home(user: str | None) -> str:
    """A user's home as envd assumes it: root's /root, any other's /home/USER."""
    return "/root" if user in (None, "root") else f"/home/{user}"


def _rfc3339_ns(ns: int) -> str:
    seconds, rest = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{rest:09d}Z"


def entry(path: str, f: FileView) -> dict[str, Any]:
    """envd's EntryInfo in proto3 JSON (int64 as a string, enums by name). Owner and group are the
    numeric ids: the /v1 API does not resolve names."""
    kind = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}.get(f.type, 0)
    info: dict[str, Any] = {
        "name": posixpath.basename(path) or "/",
        "type": {"file": "FILE_TYPE_FILE", "dir": "FILE_TYPE_DIRECTORY", "symlink": "FILE_TYPE_SYMLINK"}.get(
            f.type, "FILE_TYPE_UNSPECIFIED"
        ),
        "path": path,
        "size": str(f.size),
        "mode": f.mode,
        "permissions": stat.filemode(kind | f.mode),
        "owner": str(f.uid),
        "group": str(f.gid),
        "modifiedTime": _rfc3339_ns(f.mtime_ns),
    }
    if f.type == "symlink":
        info["isSymlink"] = True
        if f.link is not None:
            info["symlinkTarget"] = f.link
    return info


# ---- filesystem.Filesystem ----------------------------------------------------------------------


Unary = Callable[[Upstream, str, dict[str, Any], str | None], Awaitable[dict[str, Any]]]


async def stat_path(up: Upstream, sid: str, msg: dict[str, Any], user: str | None) -> dict[str, Any]:
    path = absolute(str(msg.get("path", "")), user)
    return {"entry": entry(path, await up.stat(sid, path))}


async def list_dir(up: Upstream, sid: str, msg: dict[str, Any], user: str | None) -> dict[str, Any]:
    path = absolute(str(msg.get("path", "")), user)
    depth = msg.get("depth", 1)
    if not isinstance(depth, int) or not 0 <= depth <= MAX_DEPTH:
        raise ConnectError("invalid_argument", f"depth must be 1..{MAX_DEPTH}")
    if (await up.stat(sid, path)).type != "dir":
        raise ConnectError("invalid_argument", f"{path} is not a directory")
    entries: list[dict[str, Any]] = []
    level = [path]
    for _ in range(max(depth, 1)):
        below = []
        for directory in level:
            for f in await up.list_dir(sid, directory):
                child = posixpath.join(directory, f.name)
                entries.append(entry(child, f))
                if len(entries) > MAX_LISTED:
                    raise ConnectError(
                        "resource_exhausted", f"more than {MAX_LISTED} entries: list less deep"
                    )
                if f.type == "dir":
                    below.append(child)
        level = below
    return {"entries": entries}


async def make_dir(up: Upstream, sid: str, msg: dict[str, Any], user: str | None) -> dict[str, Any]:
    path = absolute(str(msg.get("path", "")), user)
    with contextlib.suppress(UpstreamError):
        await up.stat(sid, path)
        raise ConnectError("already_exists", f"{path} already exists")
    await up.mkdir(sid, path)
    return {"entry": entry(path, await up.stat(sid, path))}


async def move(up: Upstream, sid: str, msg: dict[str, Any], user: str | None) -> dict[str, Any]:
    source = absolute(str(msg.get("source", "")), user)
    destination = absolute(str(msg.get("destination", "")), user)
    await up.rename(sid, source, destination)
    return {"entry": entry(destination, await up.stat(sid, destination))}


async def remove(up: Upstream, sid: str, msg: dict[str, Any], user: str | None) -> dict[str, Any]:
    await up.remove(sid, absolute(str(msg.get("path", "")), user))
    return {}


# ---- process.Process: commands by pid ------------------------------------------------------------

SIGNALS = {"SIGNAL_SIGKILL": 9, "SIGNAL_SIGTERM": 15, 9: 9, 15: 15}


def selected_pid(msg: dict[str, Any]) -> int:
    """The pid a ProcessSelector names; envd's other selector, a tag, is not kept by Tartarus."""
    selector = msg.get("process")
    if not isinstance(selector, dict):
        raise ConnectError("invalid_argument", "process (a selector with pid) is required")
    if "tag" in selector:
        raise ConnectError("unimplemented", "selecting a process by tag is not supported by Tartarus yet")
    pid = selector.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 1 << 32:
        raise ConnectError("invalid_argument", "process.pid must be a positive integer")
    return pid


async def list_processes(up: Upstream, sid: str, msg: dict[str, Any], user: str | None) -> dict[str, Any]:
    infos = []
    for p in await up.processes(sid):
        config: dict[str, Any] = {"cmd": p.argv[0] if p.argv else "", "args": p.argv[1:], "envs": {}}
        if p.cwd is not None:
            config["cwd"] = p.cwd
        infos.append({"config": config, "pid": p.pid})
    return {"processes": infos}


async def send_input(up: Upstream, sid: str, msg: dict[str, Any], user: str | None) -> dict[str, Any]:
    """ProcessInput is a oneof: `stdin` for a command's stdin, `pty` for a terminal's input; both are
    the same to the guest (a terminal's input is its stdin)."""
    pid = selected_pid(msg)
    await up.send_input(sid, pid, input_bytes(msg.get("input")), close=False)
    return {}


def input_bytes(given: object) -> bytes:
    """A ProcessInput's bytes (`stdin` or `pty`, base64)."""
    if not isinstance(given, dict) or len({"stdin", "pty"} & given.keys()) != 1:
        raise ConnectError("invalid_argument", "input needs exactly one of stdin and pty")
    field = "stdin" if "stdin" in given else "pty"
    try:
        return base64.b64decode(str(given[field]), validate=True)
    except binascii.Error as e:
        raise ConnectError("invalid_argument", f"input.{field} is not base64: {e}") from e


async def stream_input(request: Request, sid: str) -> Response:
    """StreamInput, a client stream (chunked over HTTP/1.1): `start` names the process, then each
    `data` event's input goes to it as it arrives, in order (`keepalive`s are skipped); once the client
    ends its stream the answer is one empty message, or the error that stopped it."""
    up = upstream_of(request)
    pid: int | None = None
    error: ConnectError | None = None
    try:
        async for msg in connect.stream_envelopes(request.stream()):
            if pid is None:
                start = msg.get("start")
                pid = selected_pid(start if isinstance(start, dict) else {})
            elif isinstance(msg.get("data"), dict):
                await up.send_input(sid, pid, input_bytes(msg["data"].get("input")), close=False)
            elif "keepalive" not in msg:
                raise ConnectError("invalid_argument", "a StreamInput message is start, data or keepalive")
        if pid is None:
            raise ConnectError("invalid_argument", "the input stream sent no start")
    except ConnectError as e:
        error = e
    except UpstreamError as e:
        if _gone(e):
            return sandbox_gone(sid)
        error = connect_error(e)
    body = (connect.envelope({}) if error is None else b"") + connect.end_stream(error)
    return Response(body, media_type=CONNECT_JSON)


def pty_size(msg: dict[str, Any]) -> TermSize | None:
    """A PTY message's size (`{"size": {"rows", "cols"}}`); None when there is no PTY message."""
    pty = msg.get("pty")
    if pty is None:
        return None
    size = pty.get("size") if isinstance(pty, dict) else None
    if not isinstance(size, dict):
        raise ConnectError("invalid_argument", "pty.size (rows and cols) is required")
    rows, cols = size.get("rows"), size.get("cols")
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= PTY_MAX:
            raise ConnectError("invalid_argument", f"pty.size.{name} must be 1-{PTY_MAX}, not {value!r}")
    return TermSize(rows=rows, cols=cols)  # type: ignore[arg-type]  # checked above


async def update(up: Upstream, sid: str, msg: dict[str, Any], user: str | None) -> dict[str, Any]:
    """Update's only change is a terminal's size."""
    pid = selected_pid(msg)
    size = pty_size(msg)
    if size is None:
        raise ConnectError("invalid_argument", "pty (the new size) is required")
    await up.resize(sid, pid, size)
    return {}


async def close_stdin(up: Upstream, sid: str, msg: dict[str, Any], user: str | None) -> dict[str, Any]:
    await up.send_input(sid, selected_pid(msg), b"", close=True)
    return {}


async def send_signal(up: Upstream, sid: str, msg: dict[str, Any], user: str | None) -> dict[str, Any]:
    pid = selected_pid(msg)
    signum = SIGNALS.get(msg.get("signal"))
    if signum is None:
        raise ConnectError("invalid_argument", "signal must be SIGNAL_SIGKILL or SIGNAL_SIGTERM")
    await up.signal(sid, pid, signum)
    return {}


UNARY: dict[str, Unary] = {
    "process.Process/List": list_processes,
    "process.Process/SendInput": send_input,
    "process.Process/CloseStdin": close_stdin,
    "process.Process/SendSignal": send_signal,
    "process.Process/Update": update,
    "filesystem.Filesystem/Stat": stat_path,
    "filesystem.Filesystem/ListDir": list_dir,
    "filesystem.Filesystem/MakeDir": make_dir,
    "filesystem.Filesystem/Move": move,
    "filesystem.Filesystem/Remove": remove,
}


# ---- filesystem.Filesystem: watching a directory ---------------------------------------------------


def watch_request(msg: dict[str, Any], user: str | None) -> tuple[str, bool]:
    """WatchDirRequest / CreateWatcherRequest: the directory and whether to watch below it. Entry info
    in events and network mounts are options of newer envds, refused by the version reported."""
    recursive = msg.get("recursive", False)
    if not isinstance(recursive, bool):
        raise ConnectError("invalid_argument", "recursive must be true or false")
    if msg.get("includeEntry") or msg.get("include_entry"):
        raise ConnectError("unimplemented", "entry info in watch events is not supported by Tartarus yet")
    return absolute(str(msg.get("path", "")), user), recursive


async def create_watcher(
    layer: Layer, up: Upstream, sid: str, msg: dict[str, Any], user: str | None
) -> dict[str, Any]:
    path, recursive = watch_request(msg, user)
    watcher_id = await layer.watchers.create(sid, up.watch(sid, path, recursive=recursive))
    return {"watcherId": watcher_id}


async def watcher_events(
    layer: Layer, up: Upstream, sid: str, msg: dict[str, Any], user: str | None
) -> dict[str, Any]:
    return {"events": layer.watchers.events(sid, str(msg.get("watcherId", "")))}


async def remove_watcher(
    layer: Layer, up: Upstream, sid: str, msg: dict[str, Any], user: str | None
) -> dict[str, Any]:
    await layer.watchers.remove(sid, str(msg.get("watcherId", "")))
    return {}


WATCHERS: dict[
    str, Callable[[Layer, Upstream, str, dict[str, Any], str | None], Awaitable[dict[str, Any]]]
] = {
    "filesystem.Filesystem/CreateWatcher": create_watcher,
    "filesystem.Filesystem/GetWatcherEvents": watcher_events,
    "filesystem.Filesystem/RemoveWatcher": remove_watcher,
}


async def watch_dir(request: Request, body: bytes, sid: str) -> Response:
    """WatchDir: `start` once the guest watches, then a `filesystem` event per change (keepalives if
    asked) until the client goes, the deadline passes or the directory goes away."""
    layer = layer_of(request)
    try:
        path, recursive = watch_request(connect.decode_single(body), await user_of(request, layer, sid))
        deadline = connect.timeout_s(request.headers.get("connect-timeout-ms"))
        changes = upstream_of(request).watch(sid, path, recursive=recursive)
        first = await anext(changes)
    except ConnectError as e:
        return _stream_of(_ended(e))
    except UpstreamError as e:
        return sandbox_gone(sid) if _gone(e) else _stream_of(_ended(connect_error(e)))
    if first.type != "started":
        await changes.aclose()
        return _stream_of(_ended(watch_error(first) or ConnectError("internal", "the watch did not start")))

    async def stream() -> AsyncIterator[bytes]:
        error: ConnectError | None = None
        # WatchDirResponse's `event` is a oneof, flattened in JSON (unlike ProcessEvent's `event` field)
        yield connect.envelope({"start": {}})
        end = None if deadline is None else asyncio.get_running_loop().time() + deadline
        try:
            ticks = keepalive(changes, _interval(request))
            async with contextlib.aclosing(ticks):
                while True:
                    left = None if end is None else end - asyncio.get_running_loop().time()
                    change = await asyncio.wait_for(anext(ticks, _ENDED), left)
                    if change is _ENDED:
                        break  # the watched directory went away
                    if change is None:
                        yield connect.envelope({"keepalive": {}})
                    elif (error := watch_error(change)) is not None:
                        break
                    elif (event := fs_event(change)) is not None:
                        yield connect.envelope({"filesystem": event})
        except TimeoutError:
            error = ConnectError("deadline_exceeded", "the watch reached its deadline")
        except UpstreamError as e:
            error = connect_error(e)
        except httpx.HTTPError as e:
            error = ConnectError("unavailable", f"the connection to the sandbox ended: {e}")
        finally:
            await changes.aclose()
        yield connect.end_stream(error)

    return StreamingResponse(stream(), media_type=CONNECT_JSON, headers={"Cache-Control": "no-cache"})


# ---- process.Process/Start ----------------------------------------------------------------------


def start_spec(msg: dict[str, Any], user: str | None, timeout: float | None) -> ExecSpec:
    process = msg.get("process")
    if not isinstance(process, dict) or not isinstance(process.get("cmd"), str) or not process["cmd"]:
        raise ConnectError("invalid_argument", "process.cmd is required")
    args = process.get("args") or []
    envs = process.get("envs") or {}
    cwd = process.get("cwd")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ConnectError("invalid_argument", "process.args must be strings")
    if not isinstance(envs, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in envs.items()
    ):
        raise ConnectError("invalid_argument", "process.envs must map strings to strings")
    if cwd is not None and not isinstance(cwd, str):
        raise ConnectError("invalid_argument", "process.cwd must be a string")
    if not isinstance(msg.get("stdin", False), bool):
        raise ConnectError("invalid_argument", "stdin must be true or false")
    return ExecSpec(
        argv=[process["cmd"], *args],
        env=envs,
        cwd=absolute(cwd, user) if cwd else (home(user) if user else None),
        user=user,
        timeout=timeout,
        pty=pty_size(msg),
    )


def process_event(event: ExecEvent, *, pty: bool = False) -> dict[str, Any] | ConnectError | None:
    """A /v1 exec event as envd's ProcessEvent (a terminal's output is `pty` data); an error ends the
    stream; None: nothing to send."""
    if event.type == "started":
        return {"event": {"start": {"pid": event.pid}}}
    if event.type in ("stdout", "stderr"):
        return {"event": {"data": {"pty" if pty else event.type: base64.b64encode(event.data).decode()}}}
    if event.type == "exit":
        if event.timed_out:
            return ConnectError("deadline_exceeded", "the command outlived its timeout and was killed")
        if event.signal:
            end = {"exitCode": -1, "exited": False, "status": f"signal: {event.signal}"}
        else:
            end = {
                "exitCode": event.exit_code or 0,
                "exited": True,
                "status": f"exit status {event.exit_code}",
            }
        return {"event": {"end": end}}
    if event.type == "error":
        if event.code == "guest_error":  # EBUSY: another client connected to the command
            return ConnectError(_ERRNO_CODES.get(event.errno or 0, "internal"), event.message or "")
        return ConnectError(
            "unavailable" if event.code == "sandbox_failed" else "internal", event.message or ""
        )
    return None


async def keepalive(source: AsyncIterator[Item], interval: float | None) -> AsyncGenerator[Item | None, None]:
    """`source`'s events, with None whenever it has been quiet for `interval` seconds (the SDK asks for
    keepalives so proxies keep an idle stream open). Close it before closing `source`: until then its
    pump may be inside `source`, and closing a generator that is running raises."""
    if not interval:
        async for each in source:
            yield each
        return
    queue: asyncio.Queue[tuple[Item | None, BaseException | None, bool]] = asyncio.Queue(maxsize=8)

    async def pump() -> None:
        try:
            async for each in source:
                await queue.put((each, None, False))
            await queue.put((None, None, True))
        except Exception as e:
            await queue.put((None, e, True))

    task = asyncio.create_task(pump())
    try:
        while True:
            item: tuple[Item | None, BaseException | None, bool]
            try:
                item = await asyncio.wait_for(queue.get(), interval)
            except TimeoutError:
                yield None
                continue
            received, error, done = item
            if error is not None:
                raise error
            if done:
                return
            yield received
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def start(request: Request, body: bytes, sid: str) -> Response:
    """Start runs a /v1 background process: like envd's, it outlives its stream (the SDK's
    `disconnect`, a client that went away) and `Connect` follows it again."""
    layer = layer_of(request)
    try:
        msg = connect.decode_single(body)
        timeout = connect.timeout_s(request.headers.get("connect-timeout-ms"))
        end = _deadline(timeout)
        user = await user_of(request, layer, sid)
        spec = start_spec(msg, user, timeout)
    except ConnectError as e:
        return _stream_of(_ended(e))
    except UpstreamError as e:
        return sandbox_gone(sid) if _gone(e) else _stream_of(_ended(connect_error(e)))
    events = upstream_of(request).start_process(sid, spec, stdin=bool(msg.get("stdin", False)))
    return await _follow(request, sid, events, end, pty=spec.pty is not None)


async def connect_process(request: Request, body: bytes, sid: str) -> Response:
    """Follow a running command; a terminal's output stays `pty` data (the list says which it is)."""
    up = upstream_of(request)
    try:
        pid = selected_pid(connect.decode_single(body))
        end = _deadline(connect.timeout_s(request.headers.get("connect-timeout-ms")))
        pty = any(p.pty for p in await up.processes(sid) if p.pid == pid)
    except ConnectError as e:
        return _stream_of(_ended(e))
    except UpstreamError as e:
        return sandbox_gone(sid) if _gone(e) else _stream_of(_ended(connect_error(e)))
    return await _follow(request, sid, up.attach(sid, pid), end, pty=pty)


def _deadline(timeout: float | None) -> float | None:
    """When a stream must end (the event loop's clock), counted from the request's arrival."""
    return None if timeout is None else asyncio.get_running_loop().time() + timeout


def _interval(request: Request) -> float | None:
    header = request.headers.get("keepalive-ping-interval")
    return max(float(header), 1.0) if header and header.isdigit() else None


async def _follow(
    request: Request,
    sid: str,
    events: AsyncGenerator[ExecEvent, None],
    end: float | None,
    *,
    pty: bool = False,
) -> Response:
    """A command's /v1 events as envd's process stream, with keepalives if the client asked, ended
    with `deadline_exceeded` at the deadline `end` (Connect's; a client that times out its reads at the
    same moment sees Connect's error first). Ending the stream leaves the command as it is: on Start
    the guest kills it at the same timeout, on Connect it runs on."""
    interval = _interval(request)
    try:
        first = await anext(events)  # the command started, or the call was refused: before any 200
    except UpstreamError as e:
        await events.aclose()
        return sandbox_gone(sid) if _gone(e) else _stream_of(_ended(connect_error(e)))

    async def stream() -> AsyncIterator[bytes]:
        error: ConnectError | None = None
        try:
            yield connect.envelope(process_event(first))  # type: ignore[arg-type]
            ticks = keepalive(events, interval)
            async with contextlib.aclosing(ticks):
                while True:
                    left = None if end is None else end - asyncio.get_running_loop().time()
                    event = await asyncio.wait_for(anext(ticks, _DONE), left)
                    if event is _DONE:
                        break
                    message = {"event": {"keepalive": {}}} if event is None else process_event(event, pty=pty)
                    if isinstance(message, ConnectError):
                        error = message
                        break
                    if message is not None:
                        yield connect.envelope(message)
        except TimeoutError:
            error = ConnectError("deadline_exceeded", "the command outlived its timeout")
        except UpstreamError as e:
            error = connect_error(e)
        except httpx.HTTPError as e:
            error = ConnectError("unavailable", f"the connection to the sandbox ended: {e}")
        finally:
            await events.aclose()
        yield connect.end_stream(error)

    return StreamingResponse(stream(), media_type=CONNECT_JSON, headers={"Cache-Control": "no-cache"})


async def _ended(error: ConnectError) -> AsyncIterator[bytes]:
    yield connect.end_stream(error)


def _stream_of(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type=CONNECT_JSON)


# ---- the routes ---------------------------------------------------------------------------------


async def read_capped(request: Request, limit: int) -> bytes:
    """The request body, refused (not buffered) past `limit` bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ConnectError("resource_exhausted", f"request body exceeds {limit} bytes")
    return bytes(body)


async def rpc(request: Request) -> Response:
    name = f"{request.path_params['service']}/{request.path_params['method']}"
    sid: str = request.state.e2b_sandbox
    streaming = name in STREAMING or name in CLIENT_STREAMING
    try:
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if name in CLIENT_STREAMING and content_type == CONNECT_JSON:
            return await stream_input(request, sid)
        body = await read_capped(request, connect.MAX_FRAME + connect.HEADER.size)
        wanted = CONNECT_JSON if streaming else "application/json"
        if name in UNIMPLEMENTED:
            raise ConnectError("unimplemented", f"{UNIMPLEMENTED[name]} is not supported by Tartarus yet")
        if name not in UNARY and name not in WATCHERS and not streaming:
            raise ConnectError("unimplemented", f"no such method: {name}")
        if content_type != wanted:
            raise ConnectError("invalid_argument", f"{name} takes {wanted}, not {content_type or 'nothing'}")
    except ConnectError as e:
        return _stream_of(_ended(e)) if streaming else JSONResponse(e.body(), e.http_status)
    if name == "process.Process/Start":
        return await start(request, body, sid)
    if name == "process.Process/Connect":
        return await connect_process(request, body, sid)
    if name == "filesystem.Filesystem/WatchDir":
        return await watch_dir(request, body, sid)
    layer = layer_of(request)
    try:
        # Only calls that take paths need the user (its home); by-pid calls skip the lookup.
        by_pid = name.startswith("process.")
        user = (
            basic_user(request.headers.get("authorization")) if by_pid else await user_of(request, layer, sid)
        )
        msg = connect.decode_json(body)
        up = upstream_of(request)
        if name in WATCHERS:
            return JSONResponse(await WATCHERS[name](layer, up, sid, msg, user))
        return JSONResponse(await UNARY[name](up, sid, msg, user))
    except ConnectError as e:
        return JSONResponse(e.body(), e.http_status)
    except UpstreamError as e:
        if _gone(e):
            return sandbox_gone(sid)
        error = connect_error(e)
        return JSONResponse(error.body(), error.http_status)


async def health(request: Request) -> Response:
    up = upstream_of(request)
    sid: str = request.state.e2b_sandbox
    try:
        view = await up.get(up.key, sid)
    except UpstreamError as e:
        if _gone(e):
            return sandbox_gone(sid)
        return http_error(connect_error(e))
    return Response(status_code=204) if view.state in ("running", "hibernated") else sandbox_gone(sid)


async def download(request: Request) -> Response:
    layer = layer_of(request)
    up = upstream_of(request)
    sid: str = request.state.e2b_sandbox
    try:
        user = request.query_params.get("username") or await layer.default_user(up, sid)
        path = absolute(request.query_params.get("path", ""), user)
        response = await up.read_file(sid, path)
    except ConnectError as e:
        return http_error(e)
    except UpstreamError as e:
        return sandbox_gone(sid) if _gone(e) else http_error(connect_error(e))

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_bytes():
                yield chunk
        finally:
            await response.aclose()

    name = posixpath.basename(path).replace('"', "")
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    return StreamingResponse(body(), media_type="application/octet-stream", headers=headers)


async def _write(up: Upstream, sid: str, path: str, chunks: AsyncIterator[bytes]) -> dict[str, str]:
    """E2B's write makes the file's missing parent directories."""
    parent = posixpath.dirname(path)
    if parent != "/":
        await up.mkdir(sid, parent)
    await up.write_file(sid, path, chunks)
    return {"name": posixpath.basename(path), "type": "file", "path": path}


async def _spooled(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(UPLOAD_CHUNK):
        yield chunk


async def upload(request: Request) -> Response:
    """One file as the raw body (`application/octet-stream`, envd 0.5.7) or one or more multipart
    parts named `file` whose filename is the destination path."""
    layer = layer_of(request)
    up = upstream_of(request)
    sid: str = request.state.e2b_sandbox
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    written = []
    try:
        user = request.query_params.get("username") or await layer.default_user(up, sid)
        if content_type == "multipart/form-data":
            async with request.form(max_files=1000, max_fields=0, max_part_size=1 << 20) as form:
                files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
                if not files:
                    raise ConnectError("invalid_argument", "the multipart body holds no file part")
                only = request.query_params.get("path") if len(files) == 1 else None
                for part in files:
                    destination = only or part.filename or ""
                    written.append(await _write(up, sid, absolute(destination, user), _spooled(part)))
        elif content_type == "application/octet-stream":
            if request.headers.get("content-encoding", "identity") != "identity":
                raise ConnectError("unimplemented", "compressed uploads are not supported yet")
            path = absolute(request.query_params.get("path", ""), user)
            written.append(await _write(up, sid, path, request.stream()))
        else:
            raise ConnectError(
                "invalid_argument", f"upload as multipart/form-data or octet-stream, not {content_type!r}"
            )
    except ConnectError as e:
        return http_error(e)
    except UpstreamError as e:
        return sandbox_gone(sid) if _gone(e) else http_error(connect_error(e))
    return JSONResponse(written)


def create_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/files", download, methods=["GET"]),
            Route("/files", upload, methods=["POST"]),
            Route("/{service}/{method}", rpc, methods=["POST"]),
        ]
    )
