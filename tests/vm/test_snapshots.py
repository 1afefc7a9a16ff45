"""Sandboxes restored from the python-ds snapshot: warm run_code, distinct clones, isolation, pool."""

from __future__ import annotations

import ast
import asyncio
import time
from pathlib import Path

import pytest

from tartarus.errors import Timeout
from tartarus.sandbox.sandbox import Sandbox as HostSandbox
from tartarus.sdk import Sandbox
from tartarus.snapshots.build import ensure_snapshot
from tartarus.snapshots.pool import VMMPool
from tartarus.templates.built import Template
from tests.conftest import qemu_pids


def test_python_ds_is_restored_with_a_warm_interpreter(sandbox: Sandbox) -> None:
    assert sandbox.info.restored is True
    assert set(sandbox.info.timings_ms) >= {"state_loaded", "guest_resumed", "first_answer"}
    # numpy and pandas are already imported in the snapshot: no import cost on the first call.
    out = sandbox.run_code(
        "import sys; ('numpy' in sys.modules, 'pandas' in sys.modules, 'sklearn' in sys.modules)"
    )
    assert out.result == "(True, True, True)"


def test_run_code_keeps_state_and_captures_output(sandbox: Sandbox) -> None:
    sandbox.run_code("df = pd.DataFrame({'x': [1, 2, 3, 4]})")
    described = sandbox.run_code("print('hello'); import sys; print('warn', file=sys.stderr)\ndf.describe()")
    assert described.stdout == "hello\n" and described.stderr == "warn\n"
    assert described.result is not None and "mean" in described.result and "2.5" in described.result
    assert sandbox.run_code("int(df['x'].sum())").result == "10"  # numpy 2 reprs np.int64(10)
    assert sandbox.run_code("y = 1").result is None


def test_exception_is_structured(sandbox: Sandbox) -> None:
    out = sandbox.run_code("def f():\n    raise ValueError('bad value')\nf()")
    assert out.error is not None
    assert out.error.name == "ValueError" and out.error.value == "bad value"
    assert "line 2" in out.error.traceback
    assert sandbox.run_code("1 +").error.name == "SyntaxError"  # type: ignore[union-attr]
    # The interpreter survives both, and SystemExit too.
    assert sandbox.run_code("raise SystemExit(3)").error.name == "SystemExit"  # type: ignore[union-attr]
    assert sandbox.run_code("2 * 21").result == "42"


def test_run_code_timeout_interrupts_the_cell(sandbox: Sandbox) -> None:
    with pytest.raises(Timeout):
        sandbox.run_code("import time\nwhile True: time.sleep(0.05)", timeout=1)
    assert sandbox.run_code("'still alive'").result == "'still alive'"


def test_clones_are_distinct_and_isolated(daemon_url: str) -> None:
    with (
        Sandbox.create("python-ds", url=daemon_url) as a,
        Sandbox.create("python-ds", url=daemon_url) as b,
    ):
        probe = (
            "import os, random, time, socket\n"
            "(os.urandom(16).hex(), random.random(), float(np.random.random()), time.time(),"
            " socket.gethostname(), open('/etc/machine-id').read().strip())"
        )
        ra = ast.literal_eval(a.run_code(probe).result or "")
        rb = ast.literal_eval(b.run_code(probe).result or "")
        assert ra[0] != rb[0], "kernel RNG must be reseeded per clone"
        assert ra[1] != rb[1] and ra[2] != rb[2], "Python and numpy PRNGs must be reseeded per clone"
        for r in (ra, rb):
            assert abs(r[3] - time.time()) < 5, "guest wall clock must be set on restore"
        assert (ra[4], rb[4]) == (a.id, b.id)
        assert ra[5] != rb[5] and len(ra[5]) == 32
        # A variable and a file written in one clone are absent in the other.
        a.run_code("secret = 'only in a'")
        a.files.write("/root/only-a.txt", b"a")
        assert b.run_code("'secret' in globals()").result == "False"
        assert not b.files.exists("/root/only-a.txt")


def test_many_restores_from_one_snapshot(python_ds: Template, tmp_path: Path) -> None:
    """Six concurrent restores share one memory file; each writes its own state; all are torn down."""
    snapshot = ensure_snapshot(python_ds)

    async def main() -> list[str]:
        sandboxes = await asyncio.gather(
            *(HostSandbox.restore(snapshot, python_ds, tmp_path) for _ in range(6))
        )
        try:
            for i, sb in enumerate(sandboxes):
                interp = await sb.code_interpreter()
                await interp.run_code(f"mine = {i}")
            seen = []
            for sb in sandboxes:
                interp = await sb.code_interpreter()
                seen.append((await interp.run_code("mine")).result or "")
            return seen
        finally:
            await asyncio.gather(*(sb.destroy() for sb in sandboxes))

    assert asyncio.run(main()) == [str(i) for i in range(6)]
    assert not qemu_pids(tmp_path) and not list(tmp_path.iterdir())


def test_pool_serves_and_never_fails_when_empty(python_ds: Template, tmp_path: Path) -> None:
    snapshot = ensure_snapshot(python_ds)

    async def main() -> tuple[bool, bool, bool]:
        pool = VMMPool(snapshot, python_ds, tmp_path, size=1)
        try:
            async with asyncio.timeout(60):
                while len(pool) < 1:  # the refill task pre-starts one VMM
                    await asyncio.sleep(0.05)
            first = pool.take()
            second = pool.take()  # empty now: None, and the caller restores without a pooled VMM
            a = await HostSandbox.restore(snapshot, python_ds, tmp_path, None, first)
            b = await HostSandbox.restore(snapshot, python_ds, tmp_path, None, second)
            ok = (await (await a.code_interpreter()).run_code("1+1")).result == "2"
            ok_b = (await (await b.code_interpreter()).run_code("1+1")).result == "2"
            await a.destroy()
            await b.destroy()
            return first is not None and a.timings["pooled"] == 1.0, second is None, ok and ok_b
        finally:
            await pool.close()

    assert asyncio.run(main()) == (True, True, True)
    assert not qemu_pids(tmp_path)
