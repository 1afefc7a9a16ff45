"""Admission of one sandbox spec: the policy's verdict, the sandbox's limits and its pinned network.

Everything here happens before a VMM is touched, so a rejected request costs nothing and a bad one
(limits over the caps, an unresolvable name) gets a clear error. What admission decided is applied to
the running sandbox by `Sandbox.contain`.
"""

from __future__ import annotations

import asyncio
import functools

from tartarus.errors import PolicyDenied, TartarusError
from tartarus.limits.spec import resolve_limits
from tartarus.network.policy import NONE, resolve
from tartarus.policy.engine import AdmissionRequest, PolicyEngine
from tartarus.sandbox.backend import Backend
from tartarus.sandbox.spec import Admission, SandboxSpec
from tartarus.templates.built import Template
from tartarus.templates.spec import ImageBase, builtin_spec


async def admit(
    engine: PolicyEngine, template: Template, spec: SandboxSpec, backend: Backend | None = None
) -> Admission:
    decision = engine.admit(
        AdmissionRequest(
            spec.tenant,
            template.name,
            spec.network.mode,
            template_image(template.name, template.key),
            spec.labels,
            backend,
        )
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
        template_vcpus=template.vcpus,
        template_memory_mib=template.memory_mib,
        vcpus=spec.vcpus,
        memory_mib=spec.memory_mib,
        disk_mib=spec.disk_mib,
        max_processes=spec.max_processes,
        ttl_s=spec.ttl_s,
        caps=engine.policy.limits,
        bandwidth=engine.policy.bandwidth.resolved(),
    )
    requested = NONE
    if spec.network.mode != "none":
        # Names resolve on the host, once, off the event loop; the addresses are pinned for life.
        requested = (
            await asyncio.to_thread(resolve, spec.network) if spec.network.names() else resolve(spec.network)
        )
    return Admission(decision, limits, requested)


@functools.lru_cache(maxsize=256)
def template_image(name: str, key: str) -> str | None:
    """The OCI image a template was built from, for `image:` rules (None for a Debian base, or a
    template whose spec is not in templates/). Read once per build (`key`): not YAML on every create."""
    try:
        spec = builtin_spec(name)
    except TartarusError:
        return None
    return spec.base.image if isinstance(spec.base, ImageBase) else None
