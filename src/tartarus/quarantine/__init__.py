"""Quarantine ("Typhon"): confine a sandbox live — network cut to `none`, CPU and memory clamped —
without restarting it, and let only an operator release it. Every step goes to the audit log.

The network cut is one nft rule added to the `gate` chain of the sandbox's namespace (an addition,
which the kernel commits in under a millisecond): the next forwarded packet of every flow, established
ones included, is dropped. Nothing in the guest is involved. Confining and releasing are the sandbox's
own verbs (`Sandbox.quarantine`, `Sandbox.release`); here are what triggers them at run time and what
the API shows of them.
"""
