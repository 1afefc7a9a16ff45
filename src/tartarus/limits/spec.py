"""A sandbox's limits: the template's defaults, overridden by the request, capped by policy."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tartarus.errors import InvalidArgument
from tartarus.limits.bandwidth import Bandwidth
from tartarus.templates.built import Template

DEFAULT_DISK_MIB = 4096  # the size of a template's writable layer (runtime/disks.py): the smallest disk
DAY_S = 24 * 3600.0


class LimitCaps(BaseModel):
    """The most a request may ask for (policy file `limits:`); requests above are refused, not cut."""

    model_config = ConfigDict(extra="forbid")
    max_vcpus: int = Field(8, ge=1, le=64)
    max_memory_mib: int = Field(16384, ge=128)
    max_disk_mib: int = Field(
        16384,
        ge=DEFAULT_DISK_MIB,
        description="writable disk per sandbox (sparse: what it writes is what it costs)",
    )
    max_processes: int = Field(4096, ge=20, description="guest tasks (kernel.threads-max)")
    max_ttl_s: float = Field(24 * 3600, gt=0)
    default_ttl_s: float | None = Field(
        None, gt=0, description="TTL of a sandbox whose request names none (None: no TTL)"
    )
    # Checkpoints hold a guest's RAM and disk on the host: none is kept forever by default.
    max_checkpoint_ttl_s: float = Field(30 * DAY_S, gt=0, description="a checkpoint's longest TTL")
    default_checkpoint_ttl_s: float = Field(
        7 * DAY_S, gt=0, description="TTL (after its last use) of a checkpoint whose request names none"
    )

    @model_validator(mode="after")
    def _default_within_cap(self) -> LimitCaps:
        if self.default_checkpoint_ttl_s > self.max_checkpoint_ttl_s:
            raise ValueError("default_checkpoint_ttl_s is over max_checkpoint_ttl_s")
        return self


@dataclass(frozen=True)
class Limits:
    vcpus: int
    memory_mib: int
    disk_mib: int
    max_processes: int | None  # None: the guest kernel's own default
    ttl_s: float | None
    # Bandwidth (limits/bandwidth.py), flat so that stored limits load as they are; None: unlimited.
    disk_bytes_per_s: int | None = None
    disk_iops: int | None = None
    egress_bytes_per_s: int | None = None
    ingress_bytes_per_s: int | None = None

    @property
    def bandwidth(self) -> Bandwidth:
        return Bandwidth(
            self.disk_bytes_per_s, self.disk_iops, self.egress_bytes_per_s, self.ingress_bytes_per_s
        )


def resolve_limits(
    *,
    template_vcpus: int,
    template_memory_mib: int,
    vcpus: int | None = None,
    memory_mib: int | None = None,
    disk_mib: int | None = None,
    max_processes: int | None = None,
    ttl_s: float | None = None,
    caps: LimitCaps | None = None,
    bandwidth: Bandwidth | None = None,
) -> Limits:
    """Merge and check; a clear InvalidArgument names the first limit over its cap. `bandwidth` (the
    policy's) is not requested but given."""
    caps = caps or LimitCaps()
    bandwidth = bandwidth or Bandwidth()
    limits = Limits(
        vcpus=vcpus or template_vcpus,
        memory_mib=memory_mib or template_memory_mib,
        disk_mib=disk_mib or DEFAULT_DISK_MIB,
        max_processes=max_processes,
        ttl_s=ttl_s if ttl_s is not None else caps.default_ttl_s,
        disk_bytes_per_s=bandwidth.disk_bytes_per_s,
        disk_iops=bandwidth.disk_iops,
        egress_bytes_per_s=bandwidth.egress_bytes_per_s,
        ingress_bytes_per_s=bandwidth.ingress_bytes_per_s,
    )
    checks = [
        ("vcpus", limits.vcpus, caps.max_vcpus),
        ("memory_mib", limits.memory_mib, caps.max_memory_mib),
        ("disk_mib", limits.disk_mib, caps.max_disk_mib),
        ("max_processes", limits.max_processes, caps.max_processes),
        ("ttl_s", limits.ttl_s, caps.max_ttl_s),
    ]
    for name, value, cap in checks:
        if value is not None and value > cap:
            raise InvalidArgument(f"{name}={value:g} is over this host's policy limit of {cap:g}")
    if limits.disk_mib < DEFAULT_DISK_MIB:
        raise InvalidArgument(
            f"disk_mib={limits.disk_mib} is below {DEFAULT_DISK_MIB}, the size of a template's writable "
            "layer: disks grow, they are never shrunk"
        )
    return limits


def capped_timeout(timeout: float | None, caps: LimitCaps) -> float:
    """A new timeout for a running sandbox, under the cap a create's is (`max_ttl_s`): a longer one is
    refused with the error a create gets, and so is none (null: never), which no cap admits."""
    if timeout is None:
        raise InvalidArgument(
            f"a timeout is required: this host's policy keeps a sandbox at most {caps.max_ttl_s:g} s "
            "from now (null, never, is over that limit)"
        )
    if timeout > caps.max_ttl_s:
        raise InvalidArgument(f"ttl_s={timeout:g} is over this host's policy limit of {caps.max_ttl_s:g}")
    return timeout


def checkpoint_ttl(ttl_s: float | None, caps: LimitCaps) -> float:
    """A checkpoint's TTL: the request's (refused over `max_checkpoint_ttl_s`) or the policy default."""
    if ttl_s is None:
        return caps.default_checkpoint_ttl_s
    if ttl_s > caps.max_checkpoint_ttl_s:
        raise InvalidArgument(
            f"checkpoint ttl_s={ttl_s:g} is over this host's policy limit of {caps.max_checkpoint_ttl_s:g}"
        )
    return ttl_s


def template_limits(template: Template) -> Limits:
    """A template's own limits, uncapped (what a pooled VMM is prepared with)."""
    return Limits(template.vcpus, template.memory_mib, DEFAULT_DISK_MIB, None, None)
