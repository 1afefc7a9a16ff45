"""Network ("Styx"): a network namespace, TAP and veth per sandbox, egress policy enforced by nftables.

The guest never enforces anything: its NIC is a TAP inside a namespace the host owns, and every packet
leaving that namespace passes the namespace's nft `forward` chain, whose rules the guest cannot reach.
"""

from tartarus.network.policy import NetworkPolicy
from tartarus.network.sandbox import SandboxNetwork

__all__ = ["NetworkPolicy", "SandboxNetwork"]
