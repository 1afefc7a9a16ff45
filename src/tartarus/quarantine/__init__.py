"""Quarantine ("Typhon"): confine a sandbox live — network cut to `none`, CPU and memory clamped —
without restarting it, and let only an operator release it. Every step goes to the audit log.

The network cut is one nft rule added to the `gate` chain of the sandbox's namespace (an addition,
which the kernel commits in under a millisecond): the next forwarded packet of every flow, established
ones included, is dropped. Nothing in the guest is involved.
"""

from tartarus.quarantine.actions import confine, release
from tartarus.quarantine.state import QuarantineState

__all__ = ["QuarantineState", "confine", "release"]
