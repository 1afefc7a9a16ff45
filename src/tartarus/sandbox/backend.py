"""Which backend runs a sandbox, and the one interface the sandbox drives it through.

Three backends: `kvm` (QEMU with KVM), `tcg` (QEMU's emulation, where KVM is unusable) and `gvisor`
(runsc on its systrap platform: the sandbox's code runs at host speed, but behind a user-space kernel
on the shared host kernel rather than a VM boundary). A sandbox's backend is what its create asked
for, else its template's YAML, else the daemon's (`TARTARUS_BACKEND`), else the host's VM accelerator:
TCG stays the default where KVM is unusable, for its VM boundary (README, "Backends").
"""

from __future__ import annotations

from typing import Literal, Protocol, get_args

from tartarus.errors import InvalidArgument
from tartarus.runtime.agent import AgentClient

Backend = Literal["kvm", "tcg", "gvisor"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
VM_BACKENDS: tuple[Backend, ...] = ("kvm", "tcg")


def parse_backend(raw: str, what: str) -> Backend:
    """`raw` as a backend, or a clear error naming where it came from (`what`)."""
    for backend in BACKENDS:
        if raw == backend:
            return backend
    raise InvalidArgument(f"{what} must be one of {', '.join(BACKENDS)}, not {raw!r}")


class Engine(Protocol):
    """What runs one sandbox's guest — a `MicroVM` or a `GvisorContainer` — as the sandbox and the
    daemon use it whichever it is: the guest agent's client, the host process that holds the guest,
    whether it still runs, and a kill."""

    @property
    def agent(self) -> AgentClient | None: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def running(self) -> bool: ...

    async def kill(self) -> None: ...
