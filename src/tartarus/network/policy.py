"""Per-sandbox egress policies: what a request may ask for, and its pinned, host-resolved form.

`none` (the default) lets nothing out. `allow` lets out exactly the listed destinations: CIDRs or DNS
names resolved *on the host* when the sandbox is created and pinned as addresses (the guest's own DNS
answers never widen the policy). `full` is NAT to anywhere except the host, link-local/metadata,
private and shared ranges and other sandboxes.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tartarus.errors import InvalidArgument

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = rf"^(?=.{{1,253}}$)({_LABEL}\.)*{_LABEL}$"

# Never reachable under `full`; reachable under `allow` only when a rule names them explicitly.
DENIED_RANGES: tuple[str, ...] = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",  # shared address space (carrier NAT)
    "127.0.0.0/8",
    "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",  # benchmarking range: the guests' and the uplinks' own addresses
    "224.0.0.0/4",
    "240.0.0.0/4",
)


class AllowRule(BaseModel):
    """One allowed destination: an address, a CIDR or a DNS name, and optionally ports."""

    model_config = ConfigDict(extra="forbid")
    host: str = Field(min_length=1, max_length=253, examples=["10.1.2.3", "192.0.2.0/24", "pypi.org"])
    ports: list[int] = Field(
        default_factory=list, max_length=64, description="empty: every port of that destination"
    )
    protocol: Literal["tcp", "udp"] = "tcp"

    @field_validator("ports")
    @classmethod
    def _ports(cls, ports: list[int]) -> list[int]:
        for port in ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is not in 1..65535")
        return sorted(set(ports))

    @field_validator("host")
    @classmethod
    def _host(cls, host: str) -> str:
        try:
            net = ipaddress.ip_network(host, strict=False)
        except ValueError:
            if not re.match(_HOSTNAME, host):
                raise ValueError(f"{host!r} is neither an IPv4 address, a CIDR nor a DNS name") from None
            return host.lower()
        if net.version != 4:
            raise ValueError("only IPv4 destinations are supported (the guest has no IPv6)")
        return str(net)

    @property
    def is_name(self) -> bool:
        try:
            ipaddress.ip_network(self.host)
        except ValueError:
            return True
        return False


class NetworkPolicy(BaseModel):
    """A sandbox's egress: `none` (default), `allow` (with `allow` rules) or `full` (NAT)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["none", "allow", "full"] = "none"
    allow: list[AllowRule] = Field(default_factory=list, max_length=256)

    @model_validator(mode="after")
    def _consistent(self) -> NetworkPolicy:
        if self.allow and self.mode != "allow":
            raise ValueError(f"'allow' rules need mode 'allow', not {self.mode!r}")
        if self.mode == "allow" and not self.allow:
            raise ValueError("mode 'allow' needs at least one 'allow' rule")
        return self

    def names(self) -> list[str]:
        return sorted({r.host for r in self.allow if r.is_name})


@dataclass(frozen=True)
class PinnedRule:
    network: str  # CIDR
    ports: tuple[int, ...]  # empty: all
    protocol: str


@dataclass(frozen=True)
class PinnedPolicy:
    """A policy with every name resolved to addresses: what the nft rules are made of."""

    mode: str
    rules: tuple[PinnedRule, ...] = ()
    hosts: tuple[tuple[str, str], ...] = ()  # (name, address) pairs, for the guest's /etc/hosts


NONE = PinnedPolicy("none")


def resolve(policy: NetworkPolicy) -> PinnedPolicy:
    """Resolve DNS names on the host, once; the sandbox keeps these addresses for its whole life."""
    rules: list[PinnedRule] = []
    hosts: list[tuple[str, str]] = []
    for rule in policy.allow:
        ports = tuple(rule.ports)
        if not rule.is_name:
            rules.append(PinnedRule(rule.host, ports, rule.protocol))
            continue
        try:
            infos = socket.getaddrinfo(rule.host, None, socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            raise InvalidArgument(f"network.allow: cannot resolve {rule.host!r}: {e}") from e
        addresses = sorted({str(info[4][0]) for info in infos})
        if not addresses:
            raise InvalidArgument(f"network.allow: {rule.host!r} has no IPv4 address")
        for address in addresses:
            rules.append(PinnedRule(f"{address}/32", ports, rule.protocol))
        hosts.append((rule.host, addresses[0]))
    return PinnedPolicy(policy.mode, tuple(rules), tuple(hosts))
