"""What the API shows of a sandbox's containment (network in force, quarantine, TTL)."""

from __future__ import annotations

from typing import Any

from tartarus.sandbox.sandbox import Sandbox


def containment_info(sandbox: Sandbox) -> dict[str, Any]:
    limits = sandbox.limits
    q = sandbox.quarantined
    return {
        "network": "none" if not sandbox.network or sandbox.network.cut_off else sandbox.network.policy.mode,
        "quarantined": q is not None,
        "quarantine_reason": q.reason if q else None,
        "expires_at": sandbox.created_at + limits.ttl_s if limits and limits.ttl_s else None,
    }
