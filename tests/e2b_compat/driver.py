"""Runs under the E2B SDK's own venv (tartarus/bench/e2b_sdk.py), never under Tartarus's: drives the
UNMODIFIED `e2b` SDK against the E2B endpoint that E2B_API_URL / E2B_SANDBOX_URL name, and prints what
it observed as one JSON object for tests/e2b_compat/test_sdk.py to assert on.

    python driver.py sync|async TAG [core]

`core` runs the core of the scenario only (lifecycle, commands, files; no PTY, directory watch, signed
URLs or metrics): what the oldest supported SDK is held to in CI.

Each step records the SDK's value, or the name of the exception the SDK raised: the point is which of
its own exceptions the SDK raises for Tartarus's answers.
"""

import asyncio
import io
import json
import os
import re
import sys
import time
import urllib.parse
from datetime import UTC, datetime

import httpx
from e2b import AsyncSandbox, CommandExitException, PtySize, Sandbox, SandboxQuery
from e2b.sandbox.filesystem.filesystem import WriteEntry

BLOB = bytes(range(256)) * 64 + b"\x00\r\n\xff"  # every byte value, and line ends that text modes mangle
DIR = "/tmp/e2b-suite"
WATCHED = "/home/user/watched"  # made by the default user, in its home
CHANGES = "cd ~/watched && echo hi > a.txt && chmod 600 a.txt && mv a.txt b.txt && rm b.txt"
DEADLINE = 120  # seconds a PTY's output or a watch's events may take under emulation


# `echo hi`'s output line, not the terminal's echo of the typed `echo hi` (which a space precedes):
# the line starts after a newline, or after the carriage return ending bash's bracketed-paste switch.
HI = re.compile(rb"[\r\n]hi\r\n")
RESIZED = re.compile(rb"40 132\r\nuser\r\n")  # `stty size; whoami` after the resize
ANSWER = re.compile(rb"42\r\n")  # `echo $((6*7))` through a handle that connected by pid


def pty_until(chunks, want, got=b""):
    """PTY output from the iterator `chunks` until `want` matches it (or the deadline passes)."""
    end = time.monotonic() + DEADLINE
    while not want.search(got) and time.monotonic() < end:
        got += next(chunks)
    return got


async def exit_code_async(handle):
    return (await handle.wait()).exit_code


def events_of(events):
    return [[e.type.value, e.name] for e in events]


def failure(e):
    return {"raised": type(e).__name__, "message": str(e)[:300]}


def attempt(fn):
    try:
        return fn()
    except Exception as e:
        return failure(e)


async def attempt_async(fn):
    try:
        return await fn()
    except Exception as e:
        return failure(e)


def metric_of(m):
    return {
        "cpu_count": m.cpu_count,
        "cpu_used_pct": m.cpu_used_pct,
        "mem_used": m.mem_used,
        "mem_total": m.mem_total,
        "disk_used": m.disk_used,
        "disk_total": m.disk_total,
        "age_s": (datetime.now(UTC) - m.timestamp).total_seconds(),
    }


def signed_urls(sb, path):
    """A signed URL carries no routing header: it names its sandbox only in a host of the form
    {port}-{id}.{domain} (a wildcard DNS name in front of the endpoint; with E2B_SANDBOX_URL set, as here,
    the SDK puts that one address in the URL instead). So each is sent to the endpoint with that host."""

    def fetch(url, method="GET", **kwargs):
        parts = urllib.parse.urlsplit(url)
        host = f"49983-{sb.sandbox_id}.tartarus.test"
        base = os.environ["E2B_SANDBOX_URL"]
        return httpx.request(method, f"{base}{parts.path}?{parts.query}", headers={"Host": host}, **kwargs)

    got = fetch(sb.download_url(path, use_signature_expiration=120))
    put = fetch(
        sb.upload_url("/tmp/e2b-signed/uploaded.bin", use_signature_expiration=120),
        "POST",
        files={"file": ("uploaded.bin", b"signed upload")},
    )
    quoted = urllib.parse.quote(path, safe="")
    elsewhere = sb.download_url(path).replace(quoted, urllib.parse.quote("/etc/shadow", safe=""))
    return {
        "download": [got.status_code, got.content == BLOB],
        "upload": put.status_code,
        "uploaded": attempt(lambda: sb.files.read("/tmp/e2b-signed/uploaded.bin")),
        "forged": fetch(sb.download_url(path).replace("signature=v1_", "signature=v1_x")).status_code,
        "other_path": fetch(elsewhere).status_code,
        "expired": fetch(sb.download_url(path, use_signature_expiration=-10)).status_code,
    }


def fork(sb, sid):
    """`fork()`: a running copy with the parent's files, its own id and tokens."""
    sb.files.write(f"{DIR}/forked.txt", "from the parent")
    (child,) = sb.fork(count=1)
    try:
        return {
            "is_sandbox": isinstance(child, Sandbox),
            "own_id": child.sandbox_id != sid,
            "read": child.files.read(f"{DIR}/forked.txt"),
            "run": child.commands.run(f"cat {DIR}/forked.txt; whoami").stdout,
        }
    finally:
        child.kill()


def auto_pause():
    """`on_timeout: pause`: the sandbox is paused, not killed, once its timeout passes idle, and
    connecting resumes it with its files."""
    auto = Sandbox.create(lifecycle={"on_timeout": "pause"}, timeout=3)
    try:
        auto.files.write("/tmp/auto.txt", "kept across auto-pause")
        end = time.monotonic() + DEADLINE
        while Sandbox.get_info(auto.sandbox_id).state.value != "paused" and time.monotonic() < end:
            time.sleep(0.5)
        return {
            "state": Sandbox.get_info(auto.sandbox_id).state.value,
            "resumed_read": Sandbox.connect(auto.sandbox_id).files.read("/tmp/auto.txt"),
        }
    finally:
        auto.kill()


def seconds_left(info):
    return (info.end_at - datetime.now(UTC)).total_seconds()


def sync_suite(tag, out, core=False):
    sb = Sandbox.create(metadata={"suite": tag}, timeout=300)
    sid = out["sandbox_id"] = sb.sandbox_id
    try:
        r = sb.commands.run("echo hi")
        out["echo"] = {"stdout": r.stdout, "stderr": r.stderr, "exit_code": r.exit_code}
        try:
            sb.commands.run("echo oops >&2; exit 3")
            out["fail"] = None
        except CommandExitException as e:
            out["fail"] = {"raised": type(e).__name__, "exit_code": e.exit_code, "stderr": e.stderr}
        r = sb.commands.run('echo "$GREETING"; pwd', envs={"GREETING": "hello"}, cwd="/tmp")
        out["env_cwd"] = r.stdout
        out["default_user"] = sb.commands.run('whoami; echo "$HOME"; pwd').stdout
        out["root_user"] = sb.commands.run('whoami; echo "$HOME"', user="root").stdout
        if not core:
            sync_terminal_and_watch(sb, out)
        sync_files_and_processes(sb, out, core)
        sync_lifecycle(sb, sid, tag, out, core)
    finally:
        out["kill"] = sb.kill()
    out["kill_again"] = Sandbox.kill(sid)
    out["get_after_kill"] = attempt(lambda: Sandbox.get_info(sid))
    out["run_after_kill"] = attempt(lambda: sb.commands.run("echo late"))


def sync_terminal_and_watch(sb, out):
    term = sb.pty.create(PtySize(rows=24, cols=80))
    chunks = (pty for _, _, pty in term if pty is not None)
    sb.pty.send_stdin(term.pid, b"echo hi\n")
    seen = pty_until(chunks, HI)
    sb.pty.resize(term.pid, PtySize(rows=40, cols=132))
    sb.pty.send_stdin(term.pid, b"stty size; whoami\n")
    seen = pty_until(chunks, RESIZED, seen)
    follower = sb.pty.connect(term.pid)  # takes the terminal's output over
    sb.pty.send_stdin(term.pid, b"echo $((6*7))\n")
    answer = pty_until((pty for _, _, pty in follower if pty is not None), ANSWER)
    out["pty"] = {
        "echoed": HI.search(seen) is not None,
        "resized": RESIZED.search(seen) is not None,
        "connected": ANSWER.search(answer) is not None,
        "listed": term.pid in [p.pid for p in sb.commands.list()],
        "kill": sb.pty.kill(term.pid),
        "after_kill": attempt(lambda: follower.wait().exit_code),
    }

    sb.commands.run(f"mkdir -p {WATCHED}")
    watch = sb.files.watch_dir(WATCHED)
    sb.commands.run(CHANGES)
    changes, end = [], time.monotonic() + DEADLINE
    while len(changes) < 6 and time.monotonic() < end:
        changes += events_of(watch.get_new_events())
    out["watch_dir"] = changes
    sb.files.write(f"{WATCHED}/written.txt", "via the API")
    written, end = [], time.monotonic() + DEADLINE
    while ["write", "written.txt"] not in written and time.monotonic() < end:
        written += events_of(watch.get_new_events())
    out["watch_written"] = written
    watch.stop()
    out["watch_stopped"] = attempt(lambda: watch.get_new_events())


def sync_files_and_processes(sb, out, core):
    f = sb.files
    out["write"] = f.write(f"{DIR}/data.bin", BLOB).path
    out["read_equal"] = bytes(f.read(f"{DIR}/data.bin", format="bytes")) == BLOB
    if not core:
        out["signed"] = attempt(lambda: signed_urls(sb, f"{DIR}/data.bin"))
    f.write(f"{DIR}/note.txt", "héllo\n")
    out["text"] = f.read(f"{DIR}/note.txt")
    out["exists"] = [f.exists(f"{DIR}/data.bin"), f.exists(f"{DIR}/missing")]
    out["make_dir"] = [f.make_dir(f"{DIR}/sub"), f.make_dir(f"{DIR}/sub")]
    out["list"] = sorted([e.name, e.type.value if e.type else None, e.size] for e in f.list(DIR))
    out["rename"] = f.rename(f"{DIR}/note.txt", f"{DIR}/sub/note.txt").path
    out["after_rename"] = [f.exists(f"{DIR}/note.txt"), f.read(f"{DIR}/sub/note.txt")]
    f.remove(f"{DIR}/sub")
    out["after_remove"] = f.exists(f"{DIR}/sub")
    out["read_missing"] = attempt(lambda: f.read(f"{DIR}/missing"))
    out["streamed_write"] = f.write(f"{DIR}/deep/streamed.bin", io.BytesIO(BLOB)).path  # octet-stream
    out["streamed_equal"] = bytes(f.read(f"{DIR}/deep/streamed.bin", format="bytes")) == BLOB
    many = [WriteEntry(path=f"{DIR}/many/{n}.txt", data=f"file {n}") for n in range(3)]
    out["write_files"] = [w.path for w in f.write_files(many)]  # one multipart body, three parts
    out["list_deep"] = sorted(e.path for e in f.list(DIR, depth=2))

    handle = sb.commands.run("echo bg; sleep 1; echo done", background=True)
    out["background_pid"] = handle.pid
    out["background"] = handle.wait().stdout
    out["command_timeout"] = attempt(lambda: sb.commands.run("sleep 30", timeout=2))
    # The oldest SDK has no close_stdin: its reader ends after one line instead of at end of input.
    reader = out["reader"] = "head -n 1" if core else "cat"
    cat = sb.commands.run(reader, background=True, stdin=True)
    sleeper = sb.commands.run("sleep 300", background=True)
    sleeper.disconnect()  # E2B: the command is not killed
    out["process_pids"] = {"cat": cat.pid, "sleep": sleeper.pid}
    out["processes"] = sorted([p.pid, p.cmd, p.args] for p in sb.commands.list())
    follower = sb.commands.connect(cat.pid)
    sb.commands.send_stdin(cat.pid, "hello stdin\n")
    if not core:
        sb.commands.stream_input(cat.pid, ["hello ", b"stream\n"])  # one client stream, in order
        sb.commands.close_stdin(cat.pid)  # cat reads end of file and exits
    r = follower.wait()
    out["connected"] = {"stdout": r.stdout, "exit_code": r.exit_code}
    cat.disconnect()
    out["still_running"] = sleeper.pid in [p.pid for p in sb.commands.list()]
    out["kill_pid"] = sb.commands.kill(sleeper.pid)
    out["kill_unknown"] = sb.commands.kill(999_999)
    out["stdin_unknown"] = attempt(lambda: sb.commands.send_stdin(999_999, "x"))


def sync_lifecycle(sb, sid, tag, out, core):
    f = sb.files
    out["listed"] = [
        s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"suite": tag})).next_items()
    ]
    other = Sandbox.list(query=SandboxQuery(metadata={"suite": tag + "-other"})).next_items()
    out["listed_other"] = [s.sandbox_id for s in other]
    out["listed_metadata"] = Sandbox.get_info(sid).metadata

    sb.set_timeout(900)
    out["timeout_left"] = seconds_left(sb.get_info())
    if not core:
        out["auto_pause"] = auto_pause()
        out["fork"] = attempt(lambda: fork(sb, sid))
    if not core:
        out["metrics"] = [metric_of(m) for m in sb.get_metrics()]

    f.write(f"{DIR}/state.txt", "kept across pause")
    paused = sb.pause()
    # The oldest SDK's pause answers nothing, paused now or already: only the newest tells.
    out["pause"] = True if core and paused is None else paused
    out["paused_state"] = Sandbox.get_info(sid).state.value
    if not core:
        out["pause_again"] = Sandbox.pause(sid)
    resumed = Sandbox.connect(sid)
    out["resumed_state"] = resumed.get_info().state.value
    out["resumed_read"] = resumed.files.read(f"{DIR}/state.txt")
    out["resumed_run"] = resumed.commands.run("cat " + f"{DIR}/state.txt").stdout


async def async_suite(tag, out):
    sb = await AsyncSandbox.create(metadata={"suite": tag}, timeout=300)
    sid = out["sandbox_id"] = sb.sandbox_id
    try:
        r = await sb.commands.run("echo hi")
        out["echo"] = {"stdout": r.stdout, "stderr": r.stderr, "exit_code": r.exit_code}
        try:
            await sb.commands.run("echo oops >&2; exit 3")
            out["fail"] = None
        except CommandExitException as e:
            out["fail"] = {"raised": type(e).__name__, "exit_code": e.exit_code, "stderr": e.stderr}
        r = await sb.commands.run('echo "$GREETING"; pwd', envs={"GREETING": "hello"}, cwd="/tmp")
        out["env_cwd"] = r.stdout
        out["default_user"] = (await sb.commands.run('whoami; echo "$HOME"; pwd')).stdout
        out["root_user"] = (await sb.commands.run('whoami; echo "$HOME"', user="root")).stdout

        seen, arrived = bytearray(), asyncio.Event()
        wanted = [HI]

        def on_data(data):
            seen.extend(data)
            if wanted[0].search(seen):
                arrived.set()

        term = await sb.pty.create(PtySize(rows=24, cols=80), on_data=on_data)
        await sb.pty.send_stdin(term.pid, b"echo hi\n")
        echoed = await attempt_async(lambda: asyncio.wait_for(arrived.wait(), DEADLINE))
        arrived.clear()
        wanted[0] = RESIZED
        await sb.pty.resize(term.pid, PtySize(rows=40, cols=132))
        await sb.pty.send_stdin(term.pid, b"stty size; whoami\n")
        resized = await attempt_async(lambda: asyncio.wait_for(arrived.wait(), DEADLINE))
        arrived.clear()
        del seen[:]
        wanted[0] = ANSWER
        follower = await sb.pty.connect(term.pid, on_data=on_data)  # takes the terminal's output over
        await sb.pty.send_stdin(term.pid, b"echo $((6*7))\n")
        connected = await attempt_async(lambda: asyncio.wait_for(arrived.wait(), DEADLINE))
        out["pty"] = {
            "echoed": echoed is True,
            "resized": resized is True,
            "connected": connected is True and ANSWER.search(seen) is not None,
            "listed": term.pid in [p.pid for p in await sb.commands.list()],
            "kill": await sb.pty.kill(term.pid),
            "after_kill": await attempt_async(lambda: exit_code_async(follower)),
        }

        await sb.commands.run(f"mkdir -p {WATCHED}")
        changes, six, written = [], asyncio.Event(), asyncio.Event()

        def on_event(e):
            changes.append([e.type.value, e.name])
            if len(changes) >= 6:
                six.set()
            if changes[-1] == ["write", "written.txt"]:
                written.set()

        watch = await sb.files.watch_dir(WATCHED, on_event=on_event)
        await sb.commands.run(CHANGES)
        await attempt_async(lambda: asyncio.wait_for(six.wait(), DEADLINE))
        out["watch_dir"] = list(changes)
        del changes[:]
        await sb.files.write(f"{WATCHED}/written.txt", "via the API")
        await attempt_async(lambda: asyncio.wait_for(written.wait(), DEADLINE))
        out["watch_written"] = list(changes)
        await watch.stop()
        out["watch_stopped"] = None

        f = sb.files
        out["write"] = (await f.write(f"{DIR}/data.bin", BLOB)).path
        out["read_equal"] = bytes(await f.read(f"{DIR}/data.bin", format="bytes")) == BLOB
        await f.write(f"{DIR}/note.txt", "héllo\n")
        out["text"] = await f.read(f"{DIR}/note.txt")
        out["exists"] = [await f.exists(f"{DIR}/data.bin"), await f.exists(f"{DIR}/missing")]
        out["make_dir"] = [await f.make_dir(f"{DIR}/sub"), await f.make_dir(f"{DIR}/sub")]
        out["list"] = sorted([e.name, e.type.value if e.type else None, e.size] for e in await f.list(DIR))
        out["rename"] = (await f.rename(f"{DIR}/note.txt", f"{DIR}/sub/note.txt")).path
        out["after_rename"] = [await f.exists(f"{DIR}/note.txt"), await f.read(f"{DIR}/sub/note.txt")]
        await f.remove(f"{DIR}/sub")
        out["after_remove"] = await f.exists(f"{DIR}/sub")
        out["read_missing"] = await attempt_async(lambda: f.read(f"{DIR}/missing"))
        out["streamed_write"] = (await f.write(f"{DIR}/deep/streamed.bin", io.BytesIO(BLOB))).path
        out["streamed_equal"] = bytes(await f.read(f"{DIR}/deep/streamed.bin", format="bytes")) == BLOB
        many = [WriteEntry(path=f"{DIR}/many/{n}.txt", data=f"file {n}") for n in range(3)]
        out["write_files"] = [w.path for w in await f.write_files(many)]
        out["list_deep"] = sorted(e.path for e in await f.list(DIR, depth=2))

        handle = await sb.commands.run("echo bg; sleep 1; echo done", background=True)
        out["background_pid"] = handle.pid
        out["background"] = (await handle.wait()).stdout
        out["command_timeout"] = await attempt_async(lambda: sb.commands.run("sleep 30", timeout=2))
        out["reader"] = "cat"
        cat = await sb.commands.run("cat", background=True, stdin=True)
        sleeper = await sb.commands.run("sleep 300", background=True)
        await sleeper.disconnect()  # E2B: the command is not killed
        out["process_pids"] = {"cat": cat.pid, "sleep": sleeper.pid}
        out["processes"] = sorted([p.pid, p.cmd, p.args] for p in await sb.commands.list())
        follower = await sb.commands.connect(cat.pid)
        await sb.commands.send_stdin(cat.pid, "hello stdin\n")
        streamed = sb.commands.stream_input(cat.pid)  # one client stream, in order
        await streamed.send("hello ")
        await streamed.send(b"stream\n")
        await streamed.close()
        await sb.commands.close_stdin(cat.pid)  # cat reads end of file and exits
        r = await follower.wait()
        out["connected"] = {"stdout": r.stdout, "exit_code": r.exit_code}
        await cat.disconnect()
        out["still_running"] = sleeper.pid in [p.pid for p in await sb.commands.list()]
        out["kill_pid"] = await sb.commands.kill(sleeper.pid)
        out["kill_unknown"] = await sb.commands.kill(999_999)
        out["stdin_unknown"] = await attempt_async(lambda: sb.commands.send_stdin(999_999, "x"))

        page = await AsyncSandbox.list(query=SandboxQuery(metadata={"suite": tag})).next_items()
        out["listed"] = [s.sandbox_id for s in page]
        other = await AsyncSandbox.list(query=SandboxQuery(metadata={"suite": tag + "-other"})).next_items()
        out["listed_other"] = [s.sandbox_id for s in other]
        out["listed_metadata"] = (await AsyncSandbox.get_info(sid)).metadata

        await sb.set_timeout(900)
        out["timeout_left"] = seconds_left(await sb.get_info())
        out["metrics"] = [metric_of(m) for m in await sb.get_metrics()]

        await f.write(f"{DIR}/state.txt", "kept across pause")
        out["pause"] = await sb.pause()
        out["paused_state"] = (await AsyncSandbox.get_info(sid)).state.value
        out["pause_again"] = await AsyncSandbox.pause(sid)
        resumed = await AsyncSandbox.connect(sid)
        out["resumed_state"] = (await resumed.get_info()).state.value
        out["resumed_read"] = await resumed.files.read(f"{DIR}/state.txt")
        out["resumed_run"] = (await resumed.commands.run("cat " + f"{DIR}/state.txt")).stdout
    finally:
        out["kill"] = await sb.kill()
    out["kill_again"] = await AsyncSandbox.kill(sid)
    out["get_after_kill"] = await attempt_async(lambda: AsyncSandbox.get_info(sid))
    out["run_after_kill"] = await attempt_async(lambda: sb.commands.run("echo late"))


def main():
    mode, tag, core = sys.argv[1], sys.argv[2], sys.argv[3:] == ["core"]
    out = {}
    try:
        sync_suite(tag, out, core) if mode == "sync" else asyncio.run(async_suite(tag, out))
    except Exception as e:  # what was observed until then still goes out, with what stopped it
        out["crashed"] = failure(e)
    print(json.dumps(out), flush=True)
    # Skip the interpreter's teardown: the SDK's HTTP client (pyqwest, Rust) sometimes aborts (SIGABRT)
    # while Python finalises it after an asyncio run, once everything observed is already out.
    os._exit(0)


if __name__ == "__main__":
    main()
