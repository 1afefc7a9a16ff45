"""What the API shows of a sandbox's containment (network in force, quarantine, TTL)."""

from __future__ import annotations

from typing import Any

from tartarus.runtime.sandbox import RuntimeSandbox


def containment_info(sandbox: RuntimeSandbox) -> dict[str, Any]:
    limits = sandbox.options.limits
    q = sandbox.quarantine
    return {
        "network": "none" if not sandbox.network or sandbox.network.cut_off else sandbox.network.policy.mode,
        "quarantined": q is not None,
        "quarantine_reason": q.reason if q else None,
        "expires_at": sandbox.created_at + limits.ttl_s if limits and limits.ttl_s else None,
    }
