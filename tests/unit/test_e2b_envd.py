"""envd's translation onto /v1 (tartarus.e2b.envd), the pure parts: events, errors, paths, users and
keepalives. The same on real sandboxes through the real SDK: tests/e2b_compat/test_sdk.py."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncGenerator, AsyncIterator

import pytest
from starlette.requests import Request
from starlette.responses import StreamingResponse

from tartarus.e2b import envd
from tartarus.e2b.connect import ConnectError
from tartarus.e2b.upstream import ExecEvent, FileView, TermSize, UpstreamError


def test_exec_events_become_process_events() -> None:
    assert envd.process_event(ExecEvent("started", pid=42)) == {"event": {"start": {"pid": 42}}}
    out = envd.process_event(ExecEvent("stdout", data=b"\x00hi\xff"))
    assert out == {"event": {"data": {"stdout": base64.b64encode(b"\x00hi\xff").decode()}}}
    assert envd.process_event(ExecEvent("exit", exit_code=3)) == {
        "event": {"end": {"exitCode": 3, "exited": True, "status": "exit status 3"}}
    }
    killed = envd.process_event(ExecEvent("exit", signal=9))
    assert killed == {"event": {"end": {"exitCode": -1, "exited": False, "status": "signal: 9"}}}
    late = envd.process_event(ExecEvent("exit", exit_code=None, signal=9, timed_out=True))
    assert isinstance(late, ConnectError) and late.code == "deadline_exceeded"
    failed = envd.process_event(ExecEvent("error", code="sandbox_failed", message="VM died"))
    assert isinstance(failed, ConnectError) and failed.code == "unavailable"
    taken = envd.process_event(ExecEvent("error", code="guest_error", message="another client", errno=16))
    assert isinstance(taken, ConnectError) and taken.code == "aborted"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (UpstreamError(422, "guest_error", "no such file", 2), "not_found"),
        (UpstreamError(422, "guest_error", "exists", 17), "already_exists"),
        (UpstreamError(422, "guest_error", "denied", 13), "permission_denied"),
        (UpstreamError(422, "guest_error", "odd", 99), "unknown"),
        (UpstreamError(422, "guest_error", "no running command with pid 9", 3), "not_found"),
        (UpstreamError(422, "guest_error", "stdin is closed", 32), "failed_precondition"),
        (UpstreamError(400, "invalid_argument", "bad path"), "invalid_argument"),
        (UpstreamError(423, "quarantined", "held"), "permission_denied"),
        (UpstreamError(502, "sandbox_failed", "VM died"), "unavailable"),
        (UpstreamError(401, "unauthorized", "not this daemon's token"), "unauthenticated"),
        (UpstreamError(500, "internal", "a bug"), "internal"),
    ],
)
def test_daemon_refusals_become_envds_codes(error: UpstreamError, code: str) -> None:
    assert envd.connect_error(error).code == code


def test_paths_resolve_against_the_users_home_and_users_come_from_basic_auth() -> None:
    assert envd.absolute("/a/../b", None) == "/b"
    assert envd.absolute("notes.txt", None) == "/root/notes.txt"
    assert envd.absolute("notes.txt", "user") == "/home/user/notes.txt"
    with pytest.raises(ConnectError):
        envd.absolute("", None)
    assert envd.basic_user("Basic " + base64.b64encode(b"user:").decode()) == "user"
    assert envd.basic_user(None) is None
    with pytest.raises(ConnectError):
        envd.basic_user("Basic !!!")


def test_entries_are_proto3_json() -> None:
    f = FileView("x", "file", 0o640, 5, 1_700_000_000_123_456_789, 0, 0)
    e = envd.entry("/tmp/x", f)
    assert e["type"] == "FILE_TYPE_FILE" and e["size"] == "5" and e["permissions"] == "-rw-r-----"
    assert e["modifiedTime"] == "2023-11-14T22:13:20.123456789Z"
    link = envd.entry("/tmp/l", FileView("l", "symlink", 0o777, 1, 0, 0, 0, link="/x"))
    assert link["symlinkTarget"] == "/x" and link["type"] == "FILE_TYPE_SYMLINK"


def test_start_refuses_what_it_cannot_run() -> None:
    for process in (None, {"cmd": ""}, {"cmd": "x", "args": [1]}, {"cmd": "x", "envs": {"A": 1}}):
        with pytest.raises(ConnectError) as caught:
            envd.start_spec({"process": process}, None, None)
        assert caught.value.code == "invalid_argument"
    spec = envd.start_spec(
        {"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "pwd"], "cwd": "w"}}, None, 3.0
    )
    assert spec.argv == ["/bin/bash", "-l", "-c", "pwd"] and spec.cwd == "/root/w" and spec.timeout == 3.0


def test_a_quiet_command_gets_keepalives_and_its_events_in_order() -> None:
    async def quiet_then_done() -> AsyncIterator[ExecEvent]:
        yield ExecEvent("started", pid=1)
        await asyncio.sleep(0.35)  # a command that prints nothing for a while
        yield ExecEvent("exit", exit_code=0)

    async def collect() -> list[ExecEvent | None]:
        return [e async for e in envd.keepalive(quiet_then_done(), 0.1)]

    seen = asyncio.run(collect())
    assert seen[0] == ExecEvent("started", pid=1) and seen[-1] == ExecEvent("exit", exit_code=0)
    assert 2 <= seen.count(None) <= 4


def test_a_failing_source_raises_through_the_keepalives() -> None:
    async def failing() -> AsyncIterator[ExecEvent]:
        yield ExecEvent("started", pid=1)
        raise UpstreamError(404, "not_found", "gone")

    async def collect() -> list[ExecEvent | None]:
        return [e async for e in envd.keepalive(failing(), 5)]

    with pytest.raises(UpstreamError):
        asyncio.run(collect())


def test_a_timed_out_command_ends_its_stream_cleanly_while_the_source_still_waits() -> None:
    """A timed-out command ends the stream while the keepalive pump is still inside the source (the
    daemon's stream has not closed yet): the stream must still end with deadline_exceeded, not abort
    the HTTP response (which the SDK reads as the sandbox being unreachable)."""
    closed = asyncio.Event()

    async def times_out() -> AsyncGenerator[ExecEvent, None]:
        try:
            yield ExecEvent("started", pid=7)
            yield ExecEvent("exit", timed_out=True)
            await asyncio.Event().wait()  # the upstream stream stays open until it is closed
        finally:
            closed.set()

    async def body() -> list[bytes]:
        scope = {"type": "http", "headers": [(b"keepalive-ping-interval", b"30")]}
        response = await envd._follow(Request(scope), "sb-x", times_out(), None)
        assert isinstance(response, StreamingResponse)
        return [bytes(chunk) async for chunk in response.body_iterator]  # type: ignore[arg-type]

    chunks = asyncio.run(body())
    assert closed.is_set()
    end = json.loads(chunks[-1][5:])
    assert chunks[-1][0] == 2 and end["error"]["code"] == "deadline_exceeded"


def test_a_stream_ends_at_its_connect_deadline_though_the_command_runs_on() -> None:
    """Connect-Timeout-Ms is the stream's deadline, counted from the request: the stream ends with
    deadline_exceeded then, even if the guest has not reported the command's end yet (an SDK that
    times out its reads at the same moment must see Connect's error, not a read timeout)."""
    closed = asyncio.Event()

    async def runs_on() -> AsyncGenerator[ExecEvent, None]:
        try:
            yield ExecEvent("started", pid=7)
            await asyncio.Event().wait()  # no exit event, ever
        finally:
            closed.set()

    async def body() -> tuple[list[bytes], float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        response = await envd._follow(
            Request({"type": "http", "headers": []}), "sb-x", runs_on(), start + 0.2
        )
        assert isinstance(response, StreamingResponse)
        chunks = [bytes(chunk) async for chunk in response.body_iterator]  # type: ignore[arg-type]
        return chunks, loop.time() - start

    chunks, took = asyncio.run(body())
    assert closed.is_set() and 0.2 <= took < 5
    assert json.loads(chunks[0][5:]) == {"event": {"start": {"pid": 7}}}
    end = json.loads(chunks[-1][5:])
    assert chunks[-1][0] == 2 and end["error"]["code"] == "deadline_exceeded"


def test_process_selectors_name_a_pid_and_nothing_else() -> None:
    assert envd.selected_pid({"process": {"pid": 42}}) == 42
    with pytest.raises(ConnectError) as by_tag:
        envd.selected_pid({"process": {"tag": "web"}})
    assert by_tag.value.code == "unimplemented"
    for bad in (
        {},
        {"process": 5},
        {"process": {"pid": 0}},
        {"process": {"pid": "7"}},
        {"process": {"pid": True}},
    ):
        with pytest.raises(ConnectError) as caught:
            envd.selected_pid(bad)
        assert caught.value.code == "invalid_argument", bad
    with pytest.raises(ConnectError) as stdin:
        envd.start_spec({"process": {"cmd": "cat"}, "stdin": "yes"}, None, None)
    assert stdin.value.code == "invalid_argument"


def test_a_pty_start_asks_for_a_terminal_and_its_output_is_pty_data() -> None:
    msg = {"process": {"cmd": "/bin/bash", "args": ["-i", "-l"]}, "pty": {"size": {"rows": 24, "cols": 80}}}
    spec = envd.start_spec(msg, "user", None)
    assert spec.pty == TermSize(rows=24, cols=80)
    assert spec.cwd == "/home/user"  # E2B's commands start in the user's home
    assert envd.start_spec({"process": {"cmd": "x"}}, None, None).pty is None
    assert envd.start_spec({"process": {"cmd": "x"}}, None, None).cwd is None  # the template's workdir
    for bad in (
        {},
        {"size": {"rows": 0, "cols": 80}},
        {"size": {"rows": 24, "cols": 1001}},
        {"size": {"rows": True, "cols": 2}},
    ):
        with pytest.raises(ConnectError) as caught:
            envd.start_spec({"process": {"cmd": "x"}, "pty": bad}, None, None)
        assert caught.value.code == "invalid_argument"
    out = envd.process_event(ExecEvent("stdout", data=b"$ "), pty=True)
    assert out == {"event": {"data": {"pty": base64.b64encode(b"$ ").decode()}}}


def test_input_is_stdin_or_pty_and_update_resizes() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[object, ...]] = []

        async def send_input(self, sid: str, pid: int, data: bytes, *, close: bool) -> None:
            self.calls.append(("input", pid, data, close))

        async def resize(self, sid: str, pid: int, size: TermSize) -> None:
            self.calls.append(("resize", pid, size))

    up = Recorder()

    async def main() -> None:
        for given in ({"stdin": "aGk="}, {"pty": "ZWNobyBoaQo="}):
            await envd.send_input(up, "sb", {"process": {"pid": 5}, "input": given}, None)  # type: ignore[arg-type]
        for given in ({}, {"stdin": "aGk=", "pty": "aGk="}, {"pty": "not base64!"}):
            with pytest.raises(ConnectError) as caught:
                await envd.send_input(up, "sb", {"process": {"pid": 5}, "input": given}, None)  # type: ignore[arg-type]
            assert caught.value.code == "invalid_argument"
        msg = {"process": {"pid": 5}, "pty": {"size": {"rows": 40, "cols": 132}}}
        await envd.update(up, "sb", msg, None)  # type: ignore[arg-type]
        with pytest.raises(ConnectError):
            await envd.update(up, "sb", {"process": {"pid": 5}}, None)  # type: ignore[arg-type]

    asyncio.run(main())
    assert up.calls == [
        ("input", 5, b"hi", False),
        ("input", 5, b"echo hi\n", False),
        ("resize", 5, TermSize(40, 132)),
    ]


def test_watch_requests_resolve_paths_and_refuse_what_is_not_supported() -> None:
    assert envd.watch_request({"path": "w", "recursive": True}, "user") == ("/home/user/w", True)
    assert envd.watch_request({"path": "/tmp"}, None) == ("/tmp", False)
    for bad in ({"path": "/tmp", "recursive": "yes"}, {"path": ""}, {"path": "/tmp", "includeEntry": True}):
        with pytest.raises(ConnectError):
            envd.watch_request(bad, None)
