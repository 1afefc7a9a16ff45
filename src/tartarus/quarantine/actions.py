"""Entering and leaving quarantine for one running sandbox."""

from __future__ import annotations

import time
from pathlib import Path

from tartarus import audit
from tartarus.errors import Conflict
from tartarus.limits.bandwidth import Bandwidth
from tartarus.policy.model import QuarantineSettings
from tartarus.quarantine.state import QuarantineState
from tartarus.runtime.sandbox import RuntimeSandbox
from tartarus.runtime.throttle import throttle_disks


async def confine(
    sandbox: RuntimeSandbox,
    settings: QuarantineSettings,
    state_dir: Path,
    *,
    reason: str,
    by: str,
) -> QuarantineState:
    """Cut the network first (the urgent part), then clamp CPU, memory and disk rates, then record it.
    The sandbox's own policy stays in place behind the closed gate, for a release to reopen."""
    if sandbox.quarantine is not None:
        raise Conflict(f"sandbox {sandbox.id} is already quarantined ({sandbox.quarantine.reason})")
    t0 = time.perf_counter()
    if sandbox.network is not None:
        sandbox.network.cut()
    cut_ms = (time.perf_counter() - t0) * 1000
    if sandbox.cgroup is not None:
        sandbox.cgroup.clamp(settings.cpu_fraction, settings.memory_mib)
    state = QuarantineState(time.time(), reason, by, sandbox.options.limits)
    sandbox.quarantine = state
    audit.record(
        state_dir,
        "sandbox.quarantine",
        sandbox=sandbox.id,
        template=sandbox.template.name,
        reason=reason,
        by=by,
        network_cut_ms=round(cut_ms, 3),
        cpu_fraction=settings.cpu_fraction,
        memory_mib=settings.memory_mib,
        disk_bytes_per_s=settings.disk_bytes_per_s,
        disk_iops=settings.disk_iops,
    )
    own = sandbox.options.limits.bandwidth if sandbox.options.limits else Bandwidth()
    await throttle_disks(sandbox, own.tightened(settings.bandwidth))  # last: it needs a live VMM
    return state


async def release(sandbox: RuntimeSandbox, state_dir: Path, *, by: str) -> None:
    """Operator release: the requested network and the sandbox's own limits come back."""
    state = sandbox.quarantine
    if state is None:
        raise Conflict(f"sandbox {sandbox.id} is not quarantined")
    if sandbox.cgroup is not None and state.limits is not None:
        sandbox.cgroup.release(state.limits)
    await throttle_disks(sandbox, state.limits.bandwidth if state.limits else Bandwidth())
    if sandbox.network is not None:
        await sandbox.network.reconnect()
    sandbox.quarantine = None
    audit.record(
        state_dir,
        "sandbox.release",
        sandbox=sandbox.id,
        by=by,
        quarantined_for_s=round(time.time() - state.since, 3),
        reason=state.reason,
    )
