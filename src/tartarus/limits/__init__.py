"""Limits ("Erinyes"): each sandbox's vCPUs, memory, disk, processes and lifetime, and their enforcement.

The host enforces what a hostile guest cannot undo: cgroups on the VMM process (CPU time, memory,
threads), the writable layer's fixed size, and the TTL. The guest's process cap is applied inside the
guest (kernel.threads-max) and protects the guest from itself, not the host; see docs/security.md.
"""

from tartarus.limits.cgroups import SandboxCgroup
from tartarus.limits.spec import LimitCaps, Limits, resolve_limits

__all__ = ["LimitCaps", "Limits", "SandboxCgroup", "resolve_limits"]
