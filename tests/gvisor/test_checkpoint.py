"""runsc checkpoint / restore of a python-ds sandbox with the agent channel: one image restores many
times under new ids, each with its own channel, its own writable layer and the running process adopted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tartarus.gvisor.container import GvisorContainer, start_container
from tartarus.runtime.agent import INTERPRETER_ID, Exit, Output
from tartarus.runtime.interpreter import CodeInterpreter
from tartarus.sandbox.sandbox import new_sandbox_id
from tartarus.templates.built import Template, get_template
from tests.gvisor.helpers import DEADLINE, host_traces, output_of, require_gvisor

# Reads expressions on stdin and prints their values: a stand-in for the warm interpreter, numpy loaded.
EVALUATOR = "import numpy, sys\nfor line in sys.stdin:\n    print(eval(line), flush=True)\n"


@pytest.fixture(scope="module", autouse=True)
def gvisor_works() -> None:
    require_gvisor()


@pytest.fixture(scope="module")
def python_ds() -> Template:
    return get_template("python-ds")


def test_one_image_restores_twice_with_state_files_and_the_running_process(
    python_ds: Template, tmp_path: Path
) -> None:
    image = tmp_path / "image"

    async def main() -> None:
        box = await start_container(python_ds, new_sandbox_id(), tmp_path / "golden", timeout=DEADLINE)
        assert box.agent is not None
        evaluator = await box.agent.exec(["python3", "-c", EVALUATOR], stdin=True, request_id=INTERPRETER_ID)
        await evaluator.write_stdin(b"numpy.ones(3).sum()\n")
        assert await evaluator.next_event() == Output("stdout", b"3.0\n")
        await box.agent.write_file("/root/before-checkpoint", b"kept")
        await box.checkpoint(image)
        assert not box.running
        await box.destroy()
        assert host_traces(tmp_path / "golden") == []

        restored = []
        for name in ("one", "two"):
            clone = GvisorContainer(new_sandbox_id(), box.spec, tmp_path / name)
            await clone.restore(image, timeout=DEADLINE)
            restored.append(clone)
        try:
            for i, clone in enumerate(restored):
                assert clone.agent is not None
                adopted = clone.agent.adopt(INTERPRETER_ID, evaluator.pid)
                await adopted.write_stdin(f"{i} + 40\n".encode())
                assert await asyncio.wait_for(adopted.next_event(), DEADLINE) == Output(
                    "stdout", f"{i + 40}\n".encode()
                )
                got = b"".join([c async for c in await clone.agent.read_file("/root/before-checkpoint")])
                assert got == b"kept"
                await clone.agent.write_file(f"/root/only-in-{i}", b"x")
            assert restored[0].agent is not None
            out, _, exit_ = await output_of(restored[0].agent, ["ls", "/root"])
            assert exit_ == Exit(0, None, False)
            assert "only-in-0" in out and "only-in-1" not in out
        finally:
            for clone in restored:
                await clone.destroy()
        for name in ("one", "two"):
            assert host_traces(tmp_path / name) == []

    asyncio.run(main())


def test_a_container_created_ahead_restores_later_and_one_never_used_leaves_nothing(
    python_ds: Template, tmp_path: Path
) -> None:
    image = tmp_path / "image"

    async def main() -> None:
        box = await start_container(python_ds, new_sandbox_id(), tmp_path / "golden", timeout=DEADLINE)
        assert box.agent is not None
        await box.agent.write_file("/root/marker", b"golden")
        await box.checkpoint(image)
        await box.destroy()

        spare = GvisorContainer(new_sandbox_id(), box.spec, tmp_path / "spare")
        await spare.create()
        assert spare.running and spare.agent is None  # processes up, nothing restored into them yet
        unused = GvisorContainer(new_sandbox_id(), box.spec, tmp_path / "unused")
        await unused.create()
        await unused.destroy()
        assert host_traces(tmp_path / "unused") == []

        await spare.restore(image, timeout=DEADLINE)
        try:
            assert spare.agent is not None
            got = b"".join([c async for c in await spare.agent.read_file("/root/marker")])
            assert got == b"golden"
        finally:
            await spare.destroy()
        assert host_traces(tmp_path / "spare") == []

    asyncio.run(main())


def test_the_warm_interpreter_keeps_state_across_restores_and_each_clone_is_reseeded(
    python_ds: Template, tmp_path: Path
) -> None:
    image = tmp_path / "image"
    preload = python_ds.preload
    assert preload is not None

    async def main() -> None:
        box = await start_container(python_ds, new_sandbox_id(), tmp_path / "golden", timeout=DEADLINE)
        assert box.agent is not None
        interpreter = await CodeInterpreter.start(box.agent, preload, timeout=DEADLINE)
        assert (await interpreter.run_code("x = 41; import random; x")).result == "41"
        pid = interpreter.pid
        await box.checkpoint(image)
        await box.destroy()

        draws = []
        for name in ("one", "two"):
            clone = GvisorContainer(new_sandbox_id(), box.spec, tmp_path / name)
            await clone.restore(image, timeout=DEADLINE)
            try:
                assert clone.agent is not None
                warm = CodeInterpreter.adopt(clone.agent, pid)
                assert (await warm.run_code("x + 1", timeout=DEADLINE)).result == "42"
                assert (await warm.run_code("import sklearn, pandas; numpy.__name__")).result == "'numpy'"
                draws.append((await warm.run_code("random.random()")).result)
            finally:
                await clone.destroy()
        assert draws[0] != draws[1]  # clones of one image do not share their random streams

    asyncio.run(main())
