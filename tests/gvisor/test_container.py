"""A python-ds sandbox under real gVisor (runsc, systrap), driven through the unchanged agent protocol
client: the same checks a VM sandbox gets for exec, files, isolation and leaving nothing behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tartarus.errors import GuestError, SandboxFailed
from tartarus.gvisor.container import GvisorContainer, agent_binary, pids_under, start_container
from tartarus.gvisor.rootfs import template_tree
from tartarus.gvisor.spec import BundleSpec
from tartarus.runtime.agent import AgentClient, Exit, Output, PtySize
from tartarus.sandbox.sandbox import new_sandbox_id
from tartarus.templates.built import Template, get_template
from tests.gvisor.helpers import DEADLINE, host_traces, output_of, require_gvisor


@pytest.fixture(scope="module", autouse=True)
def gvisor_works() -> None:
    require_gvisor()


@pytest.fixture(scope="module")
def python_ds() -> Template:
    return get_template("python-ds")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@asynccontextmanager
async def container(template: Template, workdir: Path) -> AsyncIterator[GvisorContainer]:
    box = await start_container(template, new_sandbox_id(), workdir, timeout=DEADLINE)
    try:
        yield box
    finally:
        await box.destroy()
    assert host_traces(workdir) == []


def run_in(template: Template, workdir: Path, test: Callable[[AgentClient], Awaitable[None]]) -> None:
    async def main() -> None:
        async with container(template, workdir) as box:
            assert box.agent is not None
            await test(box.agent)

    asyncio.run(main())


def test_numpy_runs_in_the_sandbox(python_ds: Template, tmp_path: Path) -> None:
    async def test(agent: AgentClient) -> None:
        out, err, exit_ = await output_of(agent, ["python3", "-c", "import numpy; print(numpy.__version__)"])
        assert exit_ == Exit(0, None, False), err
        assert re.fullmatch(r"\d+\.\d+\.\d+\n", out), out

    run_in(python_ds, tmp_path / "sb", test)


def test_exit_codes_stderr_and_signals_come_back(python_ds: Template, tmp_path: Path) -> None:
    async def test(agent: AgentClient) -> None:
        out, err, exit_ = await output_of(agent, ["sh", "-c", "echo out; echo err >&2; exit 7"])
        assert (out, err, exit_) == ("out\n", "err\n", Exit(7, None, False))
        process = await agent.exec(["sleep", "30"])
        await process.signal(signal.SIGTERM)
        events = [e async for e in process.events()]
        assert events[-1] == Exit(None, signal.SIGTERM, False)

    run_in(python_ds, tmp_path / "sb", test)


def test_files_written_are_read_back_and_stay_out_of_the_shared_tree(
    python_ds: Template, tmp_path: Path
) -> None:
    data = secrets.token_bytes(300_000)  # more than one chunk each way

    async def test(agent: AgentClient) -> None:
        assert await agent.write_file("/etc/tartarus-test.bin", data) == len(data)
        assert b"".join([c async for c in await agent.read_file("/etc/tartarus-test.bin")]) == data
        out, _, _ = await output_of(agent, ["sha256sum", "/etc/tartarus-test.bin"])
        assert out.split()[0] == hashlib.sha256(data).hexdigest()

    run_in(python_ds, tmp_path / "sb", test)
    assert not (template_tree(python_ds) / "etc" / "tartarus-test.bin").exists()


def test_each_sandbox_starts_from_the_template_not_from_anothers_writes(
    python_ds: Template, tmp_path: Path
) -> None:
    async def write(agent: AgentClient) -> None:
        await agent.write_file("/root/left-behind", b"x")

    async def look(agent: AgentClient) -> None:
        with pytest.raises(GuestError):
            await agent.stat("/root/left-behind")

    run_in(python_ds, tmp_path / "one", write)
    run_in(python_ds, tmp_path / "two", look)


def test_the_sandbox_cannot_see_the_hosts_files_or_processes(python_ds: Template, tmp_path: Path) -> None:
    secret = tmp_path / f"host-secret-{secrets.token_hex(4)}"
    secret.write_text("host only\n")

    async def test(agent: AgentClient) -> None:
        with pytest.raises(GuestError):
            await agent.stat(str(secret))
        out, _, _ = await output_of(agent, ["sh", "-c", f"cat {secret}; ls /proc"])
        assert "host only" not in out
        pids = {int(p) for p in out.split() if p.isdigit()}
        assert os.getpid() not in pids  # this test's own process, seen from inside
        assert max(pids) < 100, pids  # only the sandbox's few processes: its own pid namespace

    run_in(python_ds, tmp_path / "sb", test)


def test_a_killed_sandbox_fails_its_pending_requests_with_the_reason(
    python_ds: Template, tmp_path: Path
) -> None:
    async def main() -> None:
        async with container(python_ds, tmp_path / "sb") as box:
            assert box.agent is not None
            process = await box.agent.exec(["sleep", "60"])
            await box.kill()
            assert not box.running
            with pytest.raises(SandboxFailed, match=r"gVisor sandbox exited|channel closed"):
                async with asyncio.timeout(DEADLINE):
                    async for _ in process.events():
                        pass

    asyncio.run(main())


def test_a_sandbox_that_cannot_start_says_why_and_leaves_nothing(python_ds: Template, tmp_path: Path) -> None:
    workdir = tmp_path / "sb"
    spec = BundleSpec(
        rootfs=template_tree(python_ds),
        agent=agent_binary().with_name("no-such-agent"),
        hostname="broken",
    )
    box = GvisorContainer(new_sandbox_id(), spec, workdir)
    with pytest.raises(SandboxFailed, match="no-such-agent"):
        asyncio.run(box.start(timeout=DEADLINE))
    assert host_traces(workdir) == []


def test_destroy_kills_background_processes_and_may_be_called_again(
    python_ds: Template, tmp_path: Path
) -> None:
    workdir = tmp_path / "sb"

    async def main() -> None:
        box = await start_container(python_ds, new_sandbox_id(), workdir, timeout=DEADLINE)
        assert box.agent is not None
        _, _, exit_ = await output_of(box.agent, ["sh", "-c", "setsid sleep 600 & setsid sleep 600 & echo"])
        assert exit_.exit_code == 0
        assert len(host_traces(workdir)) > 1  # the sandbox and gofer, at least, run now
        processes = pids_under(box.paths.state)
        stubs = [p for p in processes if not Path(f"/proc/{p}/cmdline").read_bytes()]
        assert stubs, processes  # systrap's stub processes: no command line to find them by
        await box.destroy()
        assert host_traces(workdir) == []
        # Dead: gone, or a zombie until the host's init (their parent since runsc daemonized them) reaps it.
        assert [p for p in processes if _alive(p)] == []
        await box.destroy()
        assert not box.running

    asyncio.run(main())


def test_stdin_env_cwd_user_and_timeouts_work_as_in_a_vm(python_ds: Template, tmp_path: Path) -> None:
    async def test(agent: AgentClient) -> None:
        process = await agent.exec(
            ["sh", "-c", "cat; echo $FOO; pwd; id -un"],
            stdin=True,
            env={"FOO": "bar"},
            cwd="/tmp",
            user="nobody",
        )
        await process.write_stdin(b"hello\n")
        await process.close_stdin()
        events = [e async for e in process.events()]
        out = b"".join(e.data for e in events if isinstance(e, Output))
        assert (out, events[-1]) == (b"hello\nbar\n/tmp\nnobody\n", Exit(0, None, False))
        slow = await agent.exec(["sleep", "30"], timeout=0.5)
        assert [e async for e in slow.events()][-1] == Exit(None, signal.SIGKILL, True)

    run_in(python_ds, tmp_path / "sb", test)


def test_the_sandbox_has_no_network_but_loopback(python_ds: Template, tmp_path: Path) -> None:
    probe = "import socket; socket.create_connection(('192.0.2.1', 80), timeout=5)"

    async def test(agent: AgentClient) -> None:
        out, _, _ = await output_of(agent, ["cat", "/proc/net/dev"])
        interfaces = [line.split(":")[0].strip() for line in out.splitlines()[2:]]
        assert interfaces == ["lo"]
        _, err, exit_ = await output_of(agent, ["python3", "-c", probe])
        assert exit_.exit_code == 1 and "OSError" in err, err

    run_in(python_ds, tmp_path / "sb", test)


def test_a_command_runs_on_a_terminal_of_the_requested_size_and_ctrl_c_reaches_it(
    python_ds: Template, tmp_path: Path
) -> None:
    # gVisor has no TIOCGPTPEER: the agent opens the terminal's slave by its name there.
    async def test(agent: AgentClient) -> None:
        process = await agent.exec(["sh", "-c", "tty; stty size"], pty=PtySize(30, 100))
        out = b"".join([e.data async for e in process.events() if isinstance(e, Output)])
        assert out.split() == [b"/dev/pts/0", b"30", b"100"]
        shell = await agent.exec(["sh", "-c", "sleep 60; exit 3"], pty=PtySize(24, 80))
        await shell.write_stdin(b"\x03")  # ^C: SIGINT to the foreground job, as on any terminal
        events = [e async for e in shell.events()]  # well before the sleep's 60 s
        assert events[-1] == Exit(None, signal.SIGINT, False), events

    run_in(python_ds, tmp_path / "sb", test)
