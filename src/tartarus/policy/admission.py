"""Admission of one create request: the policy verdict, the sandbox's limits and its pinned network.

Everything here happens before a VMM is touched, so a rejected request costs nothing and a bad one
(limits over the caps, an unresolvable name) gets a clear error.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tartarus.errors import PolicyDenied, TartarusError
from tartarus.limits.guest import set_max_processes
from tartarus.limits.spec import Limits, resolve_limits
from tartarus.network.guest import pin_names, use_relay
from tartarus.network.policy import NONE, NetworkPolicy, PinnedPolicy, resolve
from tartarus.network.sandbox import GATEWAY
from tartarus.policy.engine import AdmissionRequest, Decision, PolicyEngine
from tartarus.policy.model import QuarantineSettings
from tartarus.quarantine.actions import confine
from tartarus.runtime.sandbox import RuntimeSandbox, SandboxOptions
from tartarus.runtime.throttle import apply_bandwidth
from tartarus.templates.spec import ImageBase, builtin_spec
from tartarus.templates.store import Template


@dataclass(frozen=True)
class Admission:
    decision: Decision
    limits: Limits
    network: PinnedPolicy  # what it asked for (behind a closed gate while quarantined)


@dataclass(frozen=True)
class CreateRequest:
    tenant: str
    template: str
    template_vcpus: int
    template_memory_mib: int
    network: NetworkPolicy
    image: str | None = None
    labels: Mapping[str, str] | None = None
    vcpus: int | None = None
    memory_mib: int | None = None
    disk_mib: int | None = None
    max_processes: int | None = None
    ttl_s: float | None = None


async def admit(engine: PolicyEngine, req: CreateRequest) -> Admission:
    decision = engine.admit(
        AdmissionRequest(req.tenant, req.template, req.network.mode, req.image, req.labels or {})
    )
    if decision.verdict == "reject":
        raise PolicyDenied(f"sandbox refused by policy: {decision.reason}")
    local = engine.policy.placement.local
    if decision.node != local:
        kind = "quarantine" if decision.quarantined else "general"
        raise PolicyDenied(
            f"sandbox refused here: {decision.reason}; it needs {kind} capacity, which this node "
            f"({local!r}) does not have (policy places it on {decision.node!r})"
        )
    limits = resolve_limits(
        template_vcpus=req.template_vcpus,
        template_memory_mib=req.template_memory_mib,
        vcpus=req.vcpus,
        memory_mib=req.memory_mib,
        disk_mib=req.disk_mib,
        max_processes=req.max_processes,
        ttl_s=req.ttl_s,
        caps=engine.policy.limits,
        bandwidth=engine.policy.bandwidth.resolved(),
    )
    requested = NONE
    if req.network.mode != "none":
        # Names resolve on the host, once, off the event loop; the addresses are pinned for life.
        requested = (
            await asyncio.to_thread(resolve, req.network) if req.network.names() else resolve(req.network)
        )
    return Admission(decision, limits, requested)


def create_request(
    template: Template, options: SandboxOptions, tenant: str, labels: Mapping[str, str] | None
) -> CreateRequest:
    return CreateRequest(
        tenant=tenant,
        template=template.name,
        template_vcpus=template.vcpus,
        template_memory_mib=template.memory_mib,
        network=options.network,
        image=template_image(template.name, template.key),
        labels=labels,
        vcpus=options.vcpus,
        memory_mib=options.memory_mib,
        max_processes=options.max_processes,
        disk_mib=options.disk_mib,
        ttl_s=options.ttl_s,
    )


@functools.lru_cache(maxsize=256)
def template_image(name: str, key: str) -> str | None:
    """The OCI image a template was built from, for `image:` rules (None for a Debian base, or a
    template whose spec is not in templates/). Read once per build (`key`): not YAML on every create."""
    try:
        spec = builtin_spec(name)
    except TartarusError:
        return None
    return spec.base.image if isinstance(spec.base, ImageBase) else None


async def contain(
    sandbox: RuntimeSandbox, admission: Admission, settings: QuarantineSettings, state_dir: Path
) -> None:
    """Apply what admission decided to a sandbox that now runs: quarantine if that was the verdict
    (the gate closes before its egress rules exist), its egress, the guest process cap, its disk size.
    Records how long that took as the `containment` timing (a duration, not cumulative)."""
    t0 = time.perf_counter()
    if admission.limits.bandwidth.limited:  # a new VMM has none: unlimited costs no call
        await apply_bandwidth(sandbox, admission.limits.bandwidth)
    if admission.decision.quarantined:
        await confine(
            sandbox,
            settings,
            state_dir,
            reason=admission.decision.reason,
            by="admission" + (f":{admission.decision.rule}" if admission.decision.rule else ""),
        )
    if admission.network.mode != "none" and sandbox.network is not None:
        await sandbox.network.apply(admission.network)
        if admission.network.hosts:
            await pin_names(sandbox.agent, admission.network.hosts)
        if admission.network.mode == "full":
            await use_relay(sandbox.agent, GATEWAY)
    if admission.limits.max_processes is not None:
        await set_max_processes(sandbox.agent, admission.limits.max_processes)
    await sandbox.grow_disk(admission.limits.disk_mib)
    sandbox.timings["containment"] = time.perf_counter() - t0
