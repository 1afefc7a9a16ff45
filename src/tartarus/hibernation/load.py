"""Load a saved guest (a template snapshot, or a captured sandbox of either format) into a VMM that
waits for incoming state."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tartarus.errors import SandboxFailed
from tartarus.hibernation import image
from tartarus.hibernation.dirty import ram_mapping
from tartarus.runtime.vm import MicroVM


async def load(vm: MicroVM, path: Path, *, mapped: bool = False) -> None:
    """A QEMU stream (a snapshot, a format-1 capture) is QEMU's to load. A format-2 capture's pages are
    copied into the VMM's RAM first (devices read guest memory as they load: virtio rings), then
    QEMU loads the device state; or, `mapped`, they are in the memory file the VMM maps already (a
    lazy wake, `tartarus.hibernation.lazy`), and only the device state is loaded. The guest stays
    paused."""
    try:
        layout = image.read_header(path)
    except image.ImageError as e:
        raise SandboxFailed(str(e)) from None
    if layout is None:
        if mapped:
            raise SandboxFailed(f"{path} is a QEMU stream: its pages cannot be in a memory file")
        await vm.load_state(path)
        return
    if mapped:
        await vm.load_state(path, offset=layout.device_at)
        return
    memory_file = vm.config.memory_file
    if vm.pid is None or memory_file is None:
        raise SandboxFailed(f"{path} needs a VMM whose RAM maps its template's memory")
    try:
        start, _ = ram_mapping(vm.pid, memory_file)
        await asyncio.to_thread(image.load_pages, path, layout, vm.pid, start)
    except (OSError, LookupError) as e:  # e.g. no right to ptrace the VMM: the guest never ran
        raise SandboxFailed(f"cannot copy the saved pages of {path.parent.name} into its VMM: {e}") from e
    await vm.load_state(path, offset=layout.device_at)
