"""Runs under the E2B SDK's own venv (tartarus/bench/e2b_sdk.py), never under Tartarus's: drives the
UNMODIFIED `e2b` SDK against the E2B endpoint that E2B_API_URL / E2B_SANDBOX_URL name, and prints what
it observed as one JSON object for tests/e2b_compat/test_sdk.py to assert on.

    python driver.py sync|async TAG

Each step records the SDK's value, or the name of the exception the SDK raised: the point is which of
its own exceptions the SDK raises for Tartarus's answers.
"""

import asyncio
import io
import json
import sys
from datetime import UTC, datetime

from e2b import AsyncSandbox, CommandExitException, Sandbox, SandboxQuery
from e2b.sandbox.filesystem.filesystem import WriteEntry

BLOB = bytes(range(256)) * 64 + b"\x00\r\n\xff"  # every byte value, and line ends that text modes mangle
DIR = "/tmp/e2b-suite"


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


def seconds_left(info):
    return (info.end_at - datetime.now(UTC)).total_seconds()


def sync_suite(tag, out):
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

        f = sb.files
        out["write"] = f.write(f"{DIR}/data.bin", BLOB).path
        out["read_equal"] = bytes(f.read(f"{DIR}/data.bin", format="bytes")) == BLOB
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
        cat = sb.commands.run("cat", background=True, stdin=True)
        sleeper = sb.commands.run("sleep 300", background=True)
        sleeper.disconnect()  # E2B: the command is not killed
        out["process_pids"] = {"cat": cat.pid, "sleep": sleeper.pid}
        out["processes"] = sorted([p.pid, p.cmd, p.args] for p in sb.commands.list())
        follower = sb.commands.connect(cat.pid)
        sb.commands.send_stdin(cat.pid, "hello stdin\n")
        sb.commands.close_stdin(cat.pid)  # cat reads end of file and exits
        r = follower.wait()
        out["connected"] = {"stdout": r.stdout, "exit_code": r.exit_code}
        cat.disconnect()
        out["still_running"] = sleeper.pid in [p.pid for p in sb.commands.list()]
        out["kill_pid"] = sb.commands.kill(sleeper.pid)
        out["kill_unknown"] = sb.commands.kill(999_999)
        out["stdin_unknown"] = attempt(lambda: sb.commands.send_stdin(999_999, "x"))

        out["listed"] = [
            s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"suite": tag})).next_items()
        ]
        other = Sandbox.list(query=SandboxQuery(metadata={"suite": tag + "-other"})).next_items()
        out["listed_other"] = [s.sandbox_id for s in other]
        out["listed_metadata"] = Sandbox.get_info(sid).metadata

        sb.set_timeout(900)
        out["timeout_left"] = seconds_left(sb.get_info())
        out["metrics"] = [metric_of(m) for m in sb.get_metrics()]

        f.write(f"{DIR}/state.txt", "kept across pause")
        out["pause"] = sb.pause()
        out["paused_state"] = Sandbox.get_info(sid).state.value
        out["pause_again"] = Sandbox.pause(sid)
        resumed = Sandbox.connect(sid)
        out["resumed_state"] = resumed.get_info().state.value
        out["resumed_read"] = resumed.files.read(f"{DIR}/state.txt")
        out["resumed_run"] = resumed.commands.run("cat " + f"{DIR}/state.txt").stdout
    finally:
        out["kill"] = sb.kill()
    out["kill_again"] = Sandbox.kill(sid)
    out["get_after_kill"] = attempt(lambda: Sandbox.get_info(sid))
    out["run_after_kill"] = attempt(lambda: sb.commands.run("echo late"))


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
        cat = await sb.commands.run("cat", background=True, stdin=True)
        sleeper = await sb.commands.run("sleep 300", background=True)
        await sleeper.disconnect()  # E2B: the command is not killed
        out["process_pids"] = {"cat": cat.pid, "sleep": sleeper.pid}
        out["processes"] = sorted([p.pid, p.cmd, p.args] for p in await sb.commands.list())
        follower = await sb.commands.connect(cat.pid)
        await sb.commands.send_stdin(cat.pid, "hello stdin\n")
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
    mode, tag = sys.argv[1], sys.argv[2]
    out = {}
    try:
        sync_suite(tag, out) if mode == "sync" else asyncio.run(async_suite(tag, out))
    except Exception as e:  # what was observed until then still goes out, with what stopped it
        out["crashed"] = failure(e)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
