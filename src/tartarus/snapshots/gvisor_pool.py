"""A small pool of gVisor sandboxes whose container runsc has created ahead of any request, per
template: the sandbox and gofer processes up in their cgroups, the NIC's namespace behind its `none`
policy, the agent's channel handed in, no guest running. A create restores the template's warm image
into one (`Sandbox.start_gvisor`), which skips `runsc create`, the slower half of a restore
(docs/gvisor.md: restore P99 233 ms into a created container against 372 ms without). An empty pool
never fails a create; it makes its own container.

`GvisorReadyPool` goes further, as `snapshots.ready` does for VMs: its sandboxes are restored, made
distinct (their own id, machine-id, interpreter seed) and warmed (one `run_code`, one command) before any
request, waiting on the `none` policy; a create binds one (`Sandbox.bind`) in milliseconds.
"""

from __future__ import annotations

from tartarus.gvisor.containment import GVISOR
from tartarus.limits.spec import template_limits
from tartarus.sandbox.sandbox import Sandbox
from tartarus.snapshots.pool import SparePool
from tartarus.snapshots.ready import WarmPool, warm_up


class GvisorPool(SparePool):
    kind = "gvisor-pool"

    def take(self) -> Sandbox | None:
        """A spare whose container still runs, or None; never waits. The caller refills once its
        restore is done (a `runsc create` costs CPU the restore needs)."""
        while self._ready:
            sandbox = self._ready.popleft()
            if sandbox.container is not None and sandbox.container.running:
                return sandbox
            self._dead.append(sandbox)  # its runsc processes died while waiting; the refill cleans it
        return None

    async def _make(self) -> Sandbox:
        return await self._spare()

    async def _spare(self, sandbox_id: str | None = None) -> Sandbox:
        """A spare with the template's limits, so its cgroups exist before the create (which resizes)."""
        limits = template_limits(self.template)
        return await Sandbox.prepare_gvisor(self.template, self.root, limits=limits, sandbox_id=sandbox_id)


class GvisorReadyPool(WarmPool):
    @property
    def guest_mib(self) -> int:
        """The host memory a warm gVisor sandbox may come to use: its limit plus gVisor's own."""
        return template_limits(self.template).memory_mib + GVISOR.memory_mib

    async def _make(self) -> Sandbox:
        return await self._warm()

    async def _warm(self, sandbox_id: str | None = None) -> Sandbox:
        """A restored sandbox, distinct (its id, machine-id), its interpreter and command path run once."""
        limits = template_limits(self.template)
        prepared = await Sandbox.prepare_gvisor(
            self.template, self.root, limits=limits, sandbox_id=sandbox_id
        )
        sandbox = await Sandbox.start_gvisor(self.template, self.root, limits=limits, prepared=prepared)
        await warm_up(sandbox)
        return sandbox
