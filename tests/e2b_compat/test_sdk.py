"""E2B conformance: the UNMODIFIED `e2b` SDK (pinned, in its own venv: tartarus/bench/e2b_sdk.py) drives
a real `tartarus serve --e2b-port` with real sandboxes, sync and asyncio, with only E2B_API_KEY (a Tartarus
tenant key), E2B_API_URL and E2B_SANDBOX_URL set. driver.py runs the scenario in the SDK's venv and
reports what the SDK returned or raised; the tests here assert on that.

Two releases are pinned: the newest runs the whole scenario, sync and asyncio; the oldest supported runs
its core (lifecycle, commands, files), sync, with its key in E2B's `e2b_`+hex form, which it insists on.
A test of a feature outside the core skips for the oldest (`full_only`).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tartarus.bench.e2b_sdk import sdk_python
from tartarus.e2b import connect
from tartarus.e2b.control import e2b_form
from tests.served import Served

DRIVER = Path(__file__).with_name("driver.py")

pytestmark = pytest.mark.vm


@dataclass
class Endpoint:
    daemon: Served
    url: str  # the E2B port: E2B_API_URL and E2B_SANDBOX_URL both
    alice: str  # tenant keys
    bob: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    python = sdk_python()  # built before the daemon starts: a first build takes a while
    assert python.exists()
    port = free_port()
    daemon = Served(tmp_path_factory.mktemp("e2b") / "state", "--e2b-port", str(port))
    try:
        keys = []
        for tenant in ("alice", "bob"):
            made = httpx.post(
                f"{daemon.url}/v1/keys",
                json={"tenant": tenant},
                headers={"Authorization": f"Bearer {daemon.key}"},
                timeout=30,
            )
            made.raise_for_status()
            keys.append(str(made.json()["key"]))
        yield Endpoint(daemon, f"http://127.0.0.1:{port}", *keys)
    finally:
        daemon.stop(signal.SIGTERM)


# (SDK release, flavour): the newest in both flavours, the oldest supported in its core, sync.
RUNS = [("newest", "blocking"), ("newest", "asyncio"), ("oldest", "blocking")]


def sdk_env(endpoint: Endpoint, release: str) -> dict[str, str]:
    """The three variables an E2B program is given, and nothing else of E2B's; the oldest SDK refuses a
    key that is not `e2b_` and hex, so it gets the same key in that form."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "PYTHON"))}
    key = endpoint.alice if release == "newest" else e2b_form(endpoint.alice)
    return env | {"E2B_API_KEY": key, "E2B_API_URL": endpoint.url, "E2B_SANDBOX_URL": endpoint.url}


def full_only(observed: dict[str, Any]) -> None:
    if observed["release"] == "oldest":
        pytest.skip("the oldest supported SDK runs the core of the scenario only (docs/e2b.md)")


@pytest.fixture(scope="module", params=RUNS, ids=[f"{r}-{f}" for r, f in RUNS])
def observed(request: pytest.FixtureRequest, endpoint: Endpoint) -> dict[str, Any]:
    """What the SDK saw over one run of the scenario (driver.py), in the SDK's sync or async flavour."""
    release, flavour = request.param
    tag = f"suite-{release}-{flavour}-{secrets.token_hex(3)}"
    mode = "sync" if flavour == "blocking" else "async"
    core = ["core"] if release == "oldest" else []
    run = subprocess.run(
        [str(sdk_python(release)), str(DRIVER), mode, tag, *core],
        capture_output=True,
        text=True,
        env=sdk_env(endpoint, release),
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out: dict[str, Any] = json.loads(run.stdout)
    out["tag"], out["release"] = tag, release
    return out


def test_the_scenario_ran_to_its_end(observed: dict[str, Any]) -> None:
    assert "crashed" not in observed, observed.get("crashed")


def test_commands_run_returns_stdout_and_exit_code(observed: dict[str, Any]) -> None:
    assert observed["echo"] == {"stdout": "hi\n", "stderr": "", "exit_code": 0}
    assert observed["env_cwd"] == "hello\n/tmp\n"  # envs and cwd reach the command


def test_commands_run_as_user_in_its_home_by_default_and_as_root_when_asked(observed: dict[str, Any]) -> None:
    assert observed["default_user"] == "user\n/home/user\n/home/user\n"  # base's E2B user, in its home
    assert observed["root_user"] == "root\n/root\n"


def test_a_pty_takes_input_resizes_is_connected_to_and_killed(observed: dict[str, Any]) -> None:
    """`echo hi` typed into the terminal comes back (echoed, then its output); after a resize `stty size`
    inside reports the new size, and the shell runs as `user`; a handle that connects by pid takes the
    output over; kill ends it by signal."""
    full_only(observed)
    pty = observed["pty"]
    assert pty["echoed"] is True and pty["resized"] is True and pty["connected"] is True
    assert pty["listed"] is True  # a PTY is a running command like any other
    assert pty["kill"] is True
    assert pty["after_kill"]["raised"] == "CommandExitException", pty["after_kill"]


def test_watch_dir_sees_the_guests_changes_in_order(observed: dict[str, Any]) -> None:
    full_only(observed)
    assert observed["watch_dir"] == [
        ["create", "a.txt"],
        ["write", "a.txt"],
        ["chmod", "a.txt"],
        ["rename", "a.txt"],
        ["create", "b.txt"],
        ["remove", "b.txt"],
    ]
    # a file written through the SDK shows under its own name (not the agent's temporary one)
    assert ["create", "written.txt"] in observed["watch_written"]
    assert ["write", "written.txt"] in observed["watch_written"]
    assert all(name == "written.txt" for _, name in observed["watch_written"])  # no temporary file


def test_a_nonzero_exit_raises_the_sdks_command_exit_exception(observed: dict[str, Any]) -> None:
    assert observed["fail"] == {"raised": "CommandExitException", "exit_code": 3, "stderr": "oops\n"}


def test_files_round_trip_binary_and_text(observed: dict[str, Any]) -> None:
    assert observed["write"] == "/tmp/e2b-suite/data.bin"  # its parent directory made on the way
    assert observed["read_equal"] is True  # every byte value, unmangled
    assert observed["text"] == "héllo\n"
    assert observed["exists"] == [True, False]
    assert observed["make_dir"] == [True, False]  # the second finds it there: False, as E2B's
    assert observed["list"] == [["data.bin", "file", 16388], ["note.txt", "file", 7], ["sub", "dir", 4096]]
    assert observed["rename"] == "/tmp/e2b-suite/sub/note.txt"
    assert observed["after_rename"] == [False, "héllo\n"]
    assert observed["after_remove"] is False
    assert observed["read_missing"]["raised"] == "FileNotFoundException"


def test_streamed_uploads_multi_file_uploads_and_deep_listings(observed: dict[str, Any]) -> None:
    assert observed["streamed_write"] == "/tmp/e2b-suite/deep/streamed.bin"  # octet-stream, parents made
    assert observed["streamed_equal"] is True
    assert observed["write_files"] == [f"/tmp/e2b-suite/many/{n}.txt" for n in range(3)]
    assert observed["list_deep"] == [
        "/tmp/e2b-suite/data.bin",
        "/tmp/e2b-suite/deep",
        "/tmp/e2b-suite/deep/streamed.bin",
        "/tmp/e2b-suite/many",
        *(f"/tmp/e2b-suite/many/{n}.txt" for n in range(3)),
    ]


def test_background_commands_and_timeouts(observed: dict[str, Any]) -> None:
    assert isinstance(observed["background_pid"], int) and observed["background_pid"] > 1  # the guest's pid
    assert observed["background"] == "bg\ndone\n"
    assert observed["command_timeout"]["raised"] == "TimeoutException", observed["command_timeout"]


def test_running_commands_are_listed_connected_fed_closed_and_killed_by_pid(observed: dict[str, Any]) -> None:
    pids = observed["process_pids"]
    assert pids["cat"] > 1 and pids["sleep"] > 1 and pids["cat"] != pids["sleep"]
    assert observed["processes"] == sorted(
        [
            [pids["cat"], "/bin/bash", ["-l", "-c", observed["reader"]]],
            [pids["sleep"], "/bin/bash", ["-l", "-c", "sleep 300"]],
        ]
    )
    # connect by pid, then the input sent by pid (and, but for the oldest SDK, streamed in chunks by
    # StreamInput) comes back through the new stream, and closing stdin ends the cat with its status
    streamed = "hello stdin\n" if observed["release"] == "oldest" else "hello stdin\nhello stream\n"
    assert observed["connected"] == {"stdout": streamed, "exit_code": 0}
    assert observed["still_running"] is True  # disconnected from, not killed
    assert observed["kill_pid"] is True and observed["kill_unknown"] is False
    assert observed["stdin_unknown"]["raised"] == "NotFoundException"


def test_list_filters_by_metadata(observed: dict[str, Any]) -> None:
    assert observed["listed"] == [observed["sandbox_id"]]
    assert observed["listed_other"] == []
    assert observed["listed_metadata"] == {"suite": observed["tag"]}


def test_set_timeout_moves_the_end(observed: dict[str, Any]) -> None:
    assert 800 < observed["timeout_left"] <= 900


def test_fork_makes_a_running_copy_with_the_parents_files(observed: dict[str, Any]) -> None:
    full_only(observed)
    if "-asyncio-" in observed["tag"]:
        pytest.skip("the SDK forks alike in both flavours: checked once, in the blocking run")
    assert observed["fork"] == {
        "is_sandbox": True,
        "own_id": True,
        "read": "from the parent",
        "run": "from the parentuser\n",
    }


def test_on_timeout_pause_pauses_instead_of_killing_and_connect_resumes(observed: dict[str, Any]) -> None:
    full_only(observed)
    if "-asyncio-" in observed["tag"]:
        pytest.skip("the SDK sends the lifecycle alike in both flavours: checked once, in the blocking run")
    assert observed["auto_pause"] == {"state": "paused", "resumed_read": "kept across auto-pause"}


def test_signed_urls_open_their_file_and_nothing_else(observed: dict[str, Any]) -> None:
    full_only(observed)
    if "-asyncio-" in observed["tag"]:
        pytest.skip("the SDK signs URLs alike in both flavours: checked once, in the blocking run")
    signed = observed["signed"]
    assert "raised" not in signed, signed
    assert signed["download"] == [200, True] and signed["upload"] == 200
    assert signed["uploaded"] == "signed upload"
    assert signed["forged"] == signed["other_path"] == signed["expired"] == 401


def test_metrics_are_the_sandboxes_own_measured_now(observed: dict[str, Any]) -> None:
    full_only(observed)
    (metric,) = observed["metrics"]
    assert metric["cpu_count"] == 1 and 0 <= metric["cpu_used_pct"] <= 100
    assert 400 << 20 < metric["mem_total"] <= 512 << 20  # python-ds's guest: 512 MiB, less the kernel's
    assert 0 < metric["mem_used"] < metric["mem_total"]
    assert 0 < metric["disk_used"] < metric["disk_total"]
    assert -5 < metric["age_s"] < 30


def test_pause_then_connect_resumes_with_state(observed: dict[str, Any]) -> None:
    assert observed["pause"] is True
    assert observed["paused_state"] == "paused"
    if observed["release"] == "newest":
        assert observed["pause_again"] is False  # already paused: E2B's 409
    assert observed["resumed_state"] == "running"
    assert observed["resumed_read"] == "kept across pause"
    assert observed["resumed_run"] == "kept across pause"


def test_kill_then_the_sdks_not_found_errors(observed: dict[str, Any]) -> None:
    assert observed["kill"] is True
    assert observed["kill_again"] is False
    assert observed["get_after_kill"]["raised"] == "SandboxNotFoundException"
    # E2B's 502 for a gone sandbox: the newest SDK says it is not running, the oldest that it timed out
    gone = {"newest": "SandboxNotRunningException", "oldest": "TimeoutException"}[observed["release"]]
    assert observed["run_after_kill"]["raised"] == gone, observed["run_after_kill"]


def test_bad_input_and_other_tenants_on_a_live_sandbox(endpoint: Endpoint) -> None:
    """Raw HTTP, as a client that is not the SDK might send: another tenant's key finds nothing, a wrong
    token opens nothing, malformed envelopes end their stream with an error (never a 500, never a hang)."""
    with httpx.Client(base_url=endpoint.url, timeout=300) as client:
        made = client.post(
            "/v2/sandboxes", json={"templateID": "base"}, headers={"X-API-KEY": endpoint.alice}
        )
        assert made.status_code == 201, made.text
        sid, token = made.json()["sandboxID"], made.json()["envdAccessToken"]
        try:
            assert client.get(f"/sandboxes/{sid}", headers={"X-API-KEY": endpoint.bob}).status_code == 404
            assert client.delete(f"/sandboxes/{sid}", headers={"X-API-KEY": endpoint.bob}).status_code == 404
            routed = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983"}
            wrong = client.get(
                "/files", params={"path": "/etc/hostname"}, headers=routed | {"X-Access-Token": "x"}
            )
            assert wrong.status_code == 401
            start = routed | {"X-Access-Token": token, "Content-Type": "application/connect+json"}
            for body in (b"\x00\x00\x00\x00\x09{}", b"\x00\x00\x00\x00\x02[]", b"\x00" + b"\xff" * 4):
                response = client.post("/process.Process/Start", content=body, headers=start, timeout=30)
                assert response.status_code == 200
                assert response.content[0] == connect.END_STREAM
                assert json.loads(response.content[5:])["error"]["code"] in (
                    "invalid_argument",
                    "resource_exhausted",
                )
            ok = client.post(
                "/process.Process/Start",
                content=connect.envelope({"process": {"cmd": "/bin/echo", "args": ["raw"]}}),
                headers=start | {"Connect-Timeout-Ms": "60000"},
            )
            messages = connect.decode_envelopes(ok.content)
            assert "pid" in messages[0]["event"]["start"]
            assert {"event": {"data": {"stdout": "cmF3Cg=="}}} in messages
            assert messages[-1] == {}  # the end-of-stream envelope: success
        finally:
            assert (
                client.delete(f"/sandboxes/{sid}", headers={"X-API-KEY": endpoint.alice}).status_code == 204
            )
