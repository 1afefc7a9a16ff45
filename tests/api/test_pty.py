"""Interactive terminals (GET /v1/sandboxes/{id}/pty over WebSocket) on a real restored sandbox."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import re
from collections.abc import Iterator

import pytest
import websockets
from websockets.sync.client import connect

from tartarus.errors import AuthError, GuestError, InvalidArgument, NotFound, SandboxFailed
from tartarus.sdk import AsyncClient, AsyncSandbox, Client, Pty, Sandbox
from tests.api.conftest import Api, tcp_daemon

pytestmark = pytest.mark.vm

DEADLINE = 60.0  # each wait ends when its output shows up; this only bounds a hang (TCG, shared host)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One daemon (SQLite): the terminal path does not touch the store beyond auth and audit."""
    state = tmp_path_factory.mktemp("api-pty")
    with tcp_daemon(state, None) as url:
        yield Api(url, state, (state / "admin.key").read_text().strip(), "sqlite")


@pytest.fixture(scope="module")
def alice(api: Api) -> str:
    return api.new_key("alice")


@pytest.fixture(scope="module")
def sandbox(api: Api, alice: str) -> Iterator[Sandbox]:
    with Sandbox.create("python-ds", url=api.url, api_key=alice) as sb:
        yield sb


def expect(pty: Pty, pattern: bytes, seen: bytearray) -> re.Match[bytes]:
    """Read terminal output into `seen` until `pattern` matches it."""
    while (match := re.search(pattern, seen)) is None:
        chunk = pty.recv(timeout=DEADLINE)
        assert chunk, f"the command exited before {pattern!r}; output: {bytes(seen)!r}"
        seen += chunk
    return match


def test_a_terminal_has_a_tty_of_the_asked_size_resizes_and_takes_ctrl_c(sandbox: Sandbox) -> None:
    seen = bytearray()
    with sandbox.pty.create(rows=30, cols=100) as pty:
        pty.send(b"tty; stty size; echo $TERM $0\n")
        expect(pty, rb"/dev/pts/\d+\r\n30 100\r\nxterm-256color \S*bash\r\n", seen)
        pty.resize(45, 132)
        pty.send(b"stty size\n")
        expect(pty, rb"45 132\r\n", seen)
        # The job prints once it runs in the foreground; then ^C must end it long before 100 s.
        pty.send(b"sh -c 'echo slept-$((1+2)); exec sleep 100'\n")
        expect(pty, rb"slept-3", seen)
        pty.send(b"\x03")
        pty.send(b"echo after-$((6*7))\n")
        expect(pty, rb"after-42", seen)
        pty.send(b"exit 7\n")
        assert pty.wait(timeout=DEADLINE) == 7
        assert pty.signal is None


def test_closing_the_socket_kills_the_session(sandbox: Sandbox) -> None:
    seen = bytearray()
    pty = sandbox.pty.create(cmd=["/bin/sh", "-i"])
    pty.send(b"sleep 4321 & sh -c 'echo job-$((2+3)); exec sleep 4322'\n")
    expect(pty, rb"job-5", seen)
    assert "sleep 432" in sandbox.commands.run("ps -eo args").stdout
    pty.close()  # the daemon kills the command and every job of its terminal
    # Another exec sees them gone (the kill lands asynchronously: poll the guest, bounded).
    result = sandbox.commands.run(
        "for i in $(seq 200); do ps -eo args | grep -q '^sleep 432' || exit 0; sleep 0.1; done; exit 1"
    )
    assert result.exit_code == 0, sandbox.commands.run("ps -eo pid,pgid,sid,args").stdout


def test_a_command_that_cannot_start_is_refused_at_the_handshake(sandbox: Sandbox) -> None:
    with pytest.raises(GuestError, match="no-such-shell"):
        sandbox.pty.create(cmd=["no-such-shell"])
    with pytest.raises(InvalidArgument, match="rows"):
        sandbox.pty.create(rows=0)


def test_bad_control_messages_get_an_error_and_the_session_goes_on(
    api: Api, alice: str, sandbox: Sandbox
) -> None:
    uri = api.url.replace("http://", "ws://") + f"/v1/sandboxes/{sandbox.id}/pty?argv=cat"
    with connect(uri, additional_headers={"Authorization": f"Bearer {alice}"}, open_timeout=DEADLINE) as ws:
        for bad in (
            "nonsense",
            json.dumps({"type": "resize", "rows": 0, "cols": 80}),
            json.dumps({"type": "x"}),
        ):
            ws.send(bad)
            reply = json.loads(ws.recv(timeout=DEADLINE))
            assert reply["type"] == "error" and reply["code"] == "invalid_argument", reply
        ws.send(b"ping\n")
        out = b""
        while b"ping\r\nping\r\n" not in out:  # the terminal's echo, then cat's copy
            message = ws.recv(timeout=DEADLINE)
            assert isinstance(message, bytes)
            out += message
        ws.send(b"\x04")  # ^D at the start of a line: cat sees end of file
        messages = [ws.recv(timeout=DEADLINE)]
        while isinstance(messages[-1], bytes):
            messages.append(ws.recv(timeout=DEADLINE))
        assert json.loads(messages[-1]) == {"type": "exit", "exit_code": 0, "signal": None}
        with pytest.raises(websockets.ConnectionClosedOK):
            ws.recv(timeout=DEADLINE)


def test_terminals_need_a_key_and_stay_within_the_tenant(api: Api, sandbox: Sandbox) -> None:
    uri = api.url.replace("http://", "ws://") + f"/v1/sandboxes/{sandbox.id}/pty"
    with pytest.raises(websockets.InvalidStatus) as refused:
        connect(uri, open_timeout=DEADLINE)
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body or b"")["error"]["code"] == "unauthorized"
    with pytest.raises(AuthError):
        Sandbox(sandbox.info, _client(api, "tartarus_" + "A" * 43)).pty.create()
    # Another tenant gets exactly what an unknown id gets.
    bob = api.new_key("bob")
    with pytest.raises(NotFound, match=f"no sandbox '{sandbox.id}'"):
        Sandbox(sandbox.info, _client(api, bob)).pty.create()
    with pytest.raises(NotFound):
        Sandbox(dataclasses.replace(sandbox.info, id="sb-000000000000"), _client(api, bob)).pty.create()
    # An admin may (like every other call on any sandbox).
    with Sandbox(sandbox.info, _client(api, api.admin_key)).pty.create(cmd="exit 5") as pty:
        assert pty.wait(timeout=DEADLINE) == 5


def _client(api: Api, key: str) -> Client:
    return Client(api.url, key)


def test_sessions_are_audited(api: Api, alice: str, sandbox: Sandbox) -> None:
    with sandbox.pty.create(cmd=["true"], rows=12, cols=34) as pty:
        assert pty.wait(timeout=DEADLINE) == 0
    bob = api.new_key("bob-audit")
    with pytest.raises(NotFound):
        Sandbox(sandbox.info, _client(api, bob)).pty.create()
    lines = [json.loads(line) for line in (api.state / "audit.log").read_text().splitlines()]
    terminals = [e for e in lines if e["action"] == "WEBSOCKET /v1/sandboxes/{sandbox_id}/pty"]
    accepted = [e for e in terminals if e["status"] == 101 and e.get("argv") == ["true"]]
    assert accepted and accepted[-1]["tenant"] == "alice" and accepted[-1]["target"] == sandbox.id
    assert (accepted[-1]["rows"], accepted[-1]["cols"]) == (12, 34)
    assert any(e["status"] == 404 and e["tenant"] == "bob-audit" for e in terminals)


def test_an_open_terminal_keeps_the_sandbox_from_idle_hibernation(api: Api, alice: str) -> None:
    with (
        Sandbox.create("python-ds", url=api.url, api_key=alice, idle_timeout=1) as sb,
        sb.pty.create(cmd=["/bin/sh"]) as pty,
    ):
        seen = bytearray()
        # Several idle checks (one a second) pass while the terminal is open and quiet.
        pty.send(b"sleep 4; echo still-$((3*3))\n")
        expect(pty, rb"still-9", seen)
        assert sb.refresh().state == "running"
        pty.send(b"exit\n")
        assert pty.wait(timeout=DEADLINE) == 0


def test_async_terminal(api: Api, alice: str, sandbox: Sandbox) -> None:
    async def main() -> bytes:
        sb = AsyncSandbox(sandbox.info, _async_client(api, alice))
        out = b""
        async with await sb.pty.create(cmd=["sh", "-c", "read line; echo got-$line"]) as pty:
            await pty.resize(20, 60)
            await pty.send("hi\n")
            async with asyncio.timeout(DEADLINE):
                async for chunk in pty:
                    out += chunk
            assert pty.exit_code == 0
        return out

    assert b"got-hi" in asyncio.run(main())


def _async_client(api: Api, key: str) -> AsyncClient:
    return AsyncClient(api.url, key)


def test_post_exec_can_run_on_a_terminal(sandbox: Sandbox, api: Api, alice: str) -> None:
    with _client(api, alice) as client:
        lines = list(
            client.stream_lines(
                "POST",
                f"/v1/sandboxes/{sandbox.id}/exec",
                json={"argv": ["sh", "-c", "tty; stty size; echo err >&2"], "pty": {"rows": 5, "cols": 7}},
            )
        )
    events = [json.loads(line) for line in lines if line.strip()]
    out = b"".join(base64.b64decode(e["data"]) for e in events if e["type"] == "stdout")
    assert not [e for e in events if e["type"] == "stderr"]
    assert re.fullmatch(rb"/dev/pts/\d+\r\n5 7\r\nerr\r\n", out), out
    assert events[-1]["type"] == "exit" and events[-1]["exit_code"] == 0


def test_unix_socket_terminal(daemon_url: str) -> None:
    """The SDK's default transport (the daemon's unix socket, local admin key) works for terminals."""
    with Sandbox.create("python-ds", url=daemon_url) as sb, sb.pty.create(cmd="echo over-$((40+2))") as pty:
        assert b"over-42\r\n" in b"".join(pty)
        assert pty.exit_code == 0


def test_destroying_the_sandbox_ends_its_terminal_with_an_error(api: Api, alice: str) -> None:
    sb = Sandbox.create("python-ds", url=api.url, api_key=alice)
    pty = sb.pty.create(cmd=["/bin/sh"])
    pty.send(b"echo up-$((1+1))\n")
    expect(pty, rb"up-2", bytearray())
    sb.kill()
    with pytest.raises(SandboxFailed):
        while pty.recv(timeout=DEADLINE):
            pass
    pty.close()
