"""Exec through the agent in a real VM: exit codes, signals, stdin, streaming, big output, timeouts."""

from __future__ import annotations

import hashlib
import signal
import time

import pytest

from tartarus.errors import GuestError, InvalidArgument
from tartarus.sdk import Sandbox


def test_runs_in_a_guest_kernel(sandbox: Sandbox) -> None:
    import platform

    result = sandbox.commands.run(["uname", "-r"])
    assert result.exit_code == 0
    assert result.stdout.strip() and result.stdout.strip() != platform.release()


@pytest.mark.parametrize("code", [0, 1, 3, 255])
def test_exit_codes(sandbox: Sandbox, code: int) -> None:
    result = sandbox.commands.run(f"exit {code}")
    assert result.exit_code == code and result.signal is None and not result.timed_out


def test_killed_by_signal(sandbox: Sandbox) -> None:
    result = sandbox.commands.run("kill -TERM $$; sleep 5")
    assert result.exit_code is None
    assert result.signal == signal.SIGTERM


def test_stdout_and_stderr_are_separate(sandbox: Sandbox) -> None:
    result = sandbox.commands.run("echo out; echo err >&2; echo out2")
    assert result.stdout == "out\nout2\n"
    assert result.stderr == "err\n"


def test_stdin_is_delivered(sandbox: Sandbox) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    result = sandbox.commands.run(["sha256sum"], stdin=data)
    assert result.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_no_stdin_means_dev_null(sandbox: Sandbox) -> None:
    assert sandbox.commands.run(["cat"]).stdout == ""


def test_interleaved_streaming_arrives_in_order_and_live(sandbox: Sandbox) -> None:
    arrivals: list[tuple[float, bytes]] = []
    script = "for i in 1 2 3; do echo o$i; echo e$i >&2; sleep 0.3; done"
    result = sandbox.commands.run(
        script,
        on_stdout=lambda b: arrivals.append((time.monotonic(), b)),
        on_stderr=lambda b: arrivals.append((time.monotonic(), b)),
    )
    assert result.stdout == "o1\no2\no3\n" and result.stderr == "e1\ne2\ne3\n"
    # Output is streamed as produced, not delivered at exit: first and last chunks are well apart.
    assert arrivals[-1][0] - arrivals[0][0] > 0.4


def test_100_mb_of_output(sandbox: Sandbox) -> None:
    seen = 0
    digest = hashlib.sha256()

    def count(chunk: bytes) -> None:
        nonlocal seen
        seen += len(chunk)
        digest.update(chunk)

    result = sandbox.commands.run("head -c 100000000 /dev/zero", on_stdout=count)
    assert result.exit_code == 0
    assert seen == 100_000_000
    assert digest.hexdigest() == hashlib.sha256(b"\0" * 100_000_000).hexdigest()


def test_timeout_kills_the_process_group(sandbox: Sandbox) -> None:
    t0 = time.monotonic()
    result = sandbox.commands.run("sleep 30 & sleep 30", timeout=1)
    assert result.timed_out and result.signal == signal.SIGKILL
    assert time.monotonic() - t0 < 15
    assert "sleep 30" not in sandbox.commands.run("ps -eo args 2>/dev/null || ls /proc").stdout


def test_env_cwd_and_user(sandbox: Sandbox) -> None:
    result = sandbox.commands.run("echo $FOO; pwd; id -u", env={"FOO": "bar"}, cwd="/tmp")
    assert result.stdout.split() == ["bar", "/tmp", "0"]
    nobody = sandbox.commands.run(["id", "-un"], user="nobody")
    assert nobody.stdout.strip() == "nobody"


def test_missing_binary_is_a_clear_error(sandbox: Sandbox) -> None:
    with pytest.raises(GuestError, match="no-such-binary"):
        sandbox.commands.run(["no-such-binary"])


def test_bad_request_is_invalid_argument(sandbox: Sandbox) -> None:
    with pytest.raises(InvalidArgument):
        sandbox.commands.run([])
    with pytest.raises(InvalidArgument):
        sandbox.commands.run(["true"], cwd="relative/path")


def test_python_ds_stack_imports(sandbox: Sandbox) -> None:
    result = sandbox.commands.run(
        [
            "python3",
            "-c",
            "import numpy, pandas, sklearn, sys; print(sys.version_info[:2], numpy.ones(3).sum())",
        ]
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == "(3, 11) 3.0"
