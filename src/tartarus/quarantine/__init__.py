"""Quarantine ("Typhon"): confine a sandbox live — network cut to `none`, CPU and memory clamped —
without restarting it, and let only an operator release it. Every step goes to the audit log.

The network cut is one nft transaction in the sandbox's namespace that empties its egress chain: the
next packet of every flow, established ones included, is dropped. Nothing in the guest is involved.
"""

from tartarus.quarantine.actions import QuarantineState, confine, release

__all__ = ["QuarantineState", "confine", "release"]
