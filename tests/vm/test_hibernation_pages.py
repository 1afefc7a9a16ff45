"""A hibernation's own pages, byte for byte: what a waking VMM holds before its guest runs is exactly
what the hibernated VMM held, including template pages the sandbox overwrote with the template's own
content or with zeros (owned, yet equal to or "simpler" than the template: a filter comparing content
would drop them wrongly)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tartarus.hibernation import image, remote
from tartarus.hibernation.dirty import own_pages_at, ram_mapping
from tartarus.hibernation.load import load
from tartarus.hibernation.stream import PAGE_SIZE
from tartarus.sandbox import capture
from tartarus.sandbox.layout import Layout
from tartarus.sandbox.sandbox import Sandbox
from tartarus.sandbox.saved import pinned
from tartarus.snapshots.build import ensure_snapshot
from tartarus.templates.built import Template


def _read(pid: int, address: int, length: int) -> bytes:
    buffer = bytearray(length)
    remote.read(pid, [(remote.address_of(buffer), length)], [(address, length)])
    return bytes(buffer)


def _template_pages(memory: Path, own: bytes, count: int) -> list[tuple[int, bytes]]:
    """`count` pages the sandbox does not own whose template content is not zero."""
    found: list[tuple[int, bytes]] = []
    with open(memory, "rb") as f:
        for page in range(len(own) // 2, len(own)):  # away from the kernel's low pages
            data = os.pread(f.fileno(), PAGE_SIZE, page * PAGE_SIZE)
            if not own[page] and data.strip(b"\0"):
                found.append((page, data))
                if len(found) == count:
                    return found
    raise AssertionError("no unowned template pages with content")


def test_owned_pages_come_back_exactly(python_ds: Template, tmp_path: Path) -> None:
    snapshot = ensure_snapshot(python_ds)
    layout = Layout(tmp_path)
    layout.sandboxes.mkdir()

    async def main() -> None:
        sandbox = await Sandbox.restore(snapshot, python_ds, layout.sandboxes)
        woken: Sandbox | None = None
        try:
            vm = sandbox.vm
            assert vm is not None and vm.pid is not None
            await (await sandbox.code_interpreter()).run_code("import os\nb = os.urandom(3 << 20)")
            await vm.pause()
            start, length = ram_mapping(vm.pid, snapshot.memory)
            (same, same_data), (zeroed, _) = _template_pages(
                snapshot.memory, own_pages_at(vm.pid, start, length), 2
            )
            for page, data in ((same, same_data), (zeroed, bytes(PAGE_SIZE))):
                buffer = bytearray(data)  # held: remote.write reads it by address
                remote.write(
                    vm.pid, [(remote.address_of(buffer), PAGE_SIZE)], [(start + page * PAGE_SIZE, PAGE_SIZE)]
                )
            own = own_pages_at(vm.pid, start, length)
            assert own[same] and own[zeroed], "a page written with the host's help is the VMM's own"
            runs = image.runs_of(own)
            before = [_read(vm.pid, start + first * PAGE_SIZE, n * PAGE_SIZE) for first, n in runs]

            saved = await sandbox.hibernate(snapshot, layout)
            layout_ = image.read_header(saved.state)
            assert layout_ is not None, "captured through QEMU's stream (format 1), not the direct path"
            assert layout_.runs == tuple(runs)

            base = pinned(layout.pins, saved.snapshot_key)
            woken = await Sandbox.prepare(base, saved.template, layout.sandboxes, layer=saved.layer)
            new = woken.vm
            assert new is not None and new.pid is not None
            await load(new, saved.state)  # loaded, not resumed: no guest has touched it since
            status = await new.qmp_execute("query-status")
            assert status["status"] != "running", "the guest started before its wake could commit"
            start2, _ = ram_mapping(new.pid, base.memory)
            after = [_read(new.pid, start2 + first * PAGE_SIZE, n * PAGE_SIZE) for first, n in runs]
            assert after == before, "an owned page came back different"
            assert _read(new.pid, start2 + same * PAGE_SIZE, PAGE_SIZE) == same_data
            assert _read(new.pid, start2 + zeroed * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
        finally:
            await sandbox.destroy()
            if woken is not None:
                await woken.destroy()

    asyncio.run(main())


def test_a_format_1_capture_still_wakes(
    python_ds: Template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What hibernations before format 2 wrote (QEMU's filtered stream; still the path when the pin
    has no snapshot stream) wakes with its memory."""
    monkeypatch.setattr(capture, "snapshot_prefix", lambda _state: None)
    snapshot = ensure_snapshot(python_ds)
    layout = Layout(tmp_path)
    layout.sandboxes.mkdir()

    async def main() -> None:
        sandbox = await Sandbox.restore(snapshot, python_ds, layout.sandboxes)
        try:
            await (await sandbox.code_interpreter()).run_code("kept = sum(range(1000))")
            saved = await sandbox.hibernate(snapshot, layout)
            with open(saved.state, "rb") as f:
                assert f.read(4) == b"QEVM", "not a format-1 capture"
            assert image.read_header(saved.state) is None
            sandbox, _ = await Sandbox.wake(saved, layout, saved.spec)
            answer = await (await sandbox.code_interpreter()).run_code("kept")
            assert answer.result == "499500"
        finally:
            await sandbox.destroy()

    asyncio.run(main())
