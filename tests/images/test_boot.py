"""A converted image boots with the guest agent and runs the image's own python3 (issue 3's done-when)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tartarus.images.api import to_template
from tartarus.images.cache import ImageBuild
from tartarus.runtime.agent import Output
from tartarus.sandbox.sandbox import Sandbox
from tests.conftest import qemu_pids

pytestmark = pytest.mark.vm


async def _run(sb: Sandbox, argv: list[str], env: dict[str, str]) -> tuple[int | None, bytes, bytes]:
    process = await sb.agent.exec(argv, env=env)
    out, err = b"", b""
    async for event in process.events():
        if isinstance(event, Output):
            if event.stream == "stdout":
                out += event.data
            else:
                err += event.data
    assert process.exit is not None
    return process.exit.exit_code, out, err


def test_converted_image_boots_and_runs_its_own_python(python_build: ImageBuild, tmp_path: Path) -> None:
    template = to_template(python_build, "python-slim-test")

    async def main() -> tuple[tuple[int | None, bytes, bytes], tuple[int | None, bytes, bytes]]:
        sb = await Sandbox.boot(template, tmp_path)
        try:
            python = await _run(sb, ["python3", "-c", "print(1+1)"], sb.env)
            where = await _run(
                sb, ["sh", "-c", "readlink -f $(command -v python3); cat /etc/hostname; echo $LANG"], sb.env
            )
            return python, where
        finally:
            await sb.destroy()

    python, where = asyncio.run(main())
    assert python == (0, b"2\n", b""), python
    assert where[1].split() == [b"/usr/bin/python3.11", b"tartarus-python", b"C.UTF-8"], where
    assert not qemu_pids(tmp_path), "the VM outlived its sandbox"
    assert not any(tmp_path.iterdir())
