"""A sandbox's bandwidth: disk bytes/s and IOPS (QEMU block throttling) and network rates (tc).

None means unlimited. The policy file's `bandwidth:` section sets them for every sandbox and its
`quarantine:` section may tighten the disk ones live; `sandbox/throttle.py` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Bandwidth:
    disk_bytes_per_s: int | None = None  # reads and writes together, both of the sandbox's drives
    disk_iops: int | None = None
    egress_bytes_per_s: int | None = None  # guest → anywhere
    ingress_bytes_per_s: int | None = None  # anywhere → guest

    @property
    def limited(self) -> bool:
        """Whether any rate is set (a new VMM has none, so an unlimited sandbox needs no call)."""
        return any(getattr(self, f.name) is not None for f in fields(self))

    def tightened(self, other: Bandwidth) -> Bandwidth:
        """Each rate the lower of the two (None is no limit): what a clamp may only lower."""

        def lower(a: int | None, b: int | None) -> int | None:
            return b if a is None else a if b is None else min(a, b)

        return Bandwidth(
            **{f.name: lower(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)}
        )
