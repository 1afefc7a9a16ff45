"""nftables rulesets, as text for `nft -f`: pure functions, so they are unit-tested without a kernel.

Two tables. In each sandbox's namespace, `inet tartarus` drops everything by default. Its `egress`
chain holds the sandbox's policy; its `gate` chain, jumped to first, is empty unless the sandbox is
cut off (quarantine), when it holds one `drop`: every forwarded packet, of established flows too, is
dropped from the next one on, and so are the guest's replies to exposed ports (the namespace's
`input` accepts from the guest only replies to connections the namespace itself opened). In the root
namespace, one shared `inet tartarus` table keeps uplinks away from the host, from each other and from
link-local addresses, whatever a namespace's rules say, and NATs their egress.

Why a gate rather than rewriting `egress`: the kernel commits rule *additions* in well under a
millisecond but waits for an RCU grace period on any deletion (8-16 ms measured here). So the hot
operations only add: a pooled sandbox's empty `egress` gets its request's rules, a quarantine adds the
`drop`. Deletions (release, a policy change) are off the measured paths.
"""

from __future__ import annotations

from tartarus.network.policy import DENIED_RANGES, PinnedPolicy

TABLE = "tartarus"
TAP = "tap0"  # the guest's NIC, inside the namespace
UPLINK = "up0"  # the namespace's end of the veth pair
HOST_PREFIX = "trt"  # root-namespace ends of the veth pairs: trt<slot>
UPLINK_POOL = "198.19.0.0/16"  # /30 per uplink; guests themselves sit in 198.18.0.0/30


def _egress(policy: PinnedPolicy) -> list[str]:
    """The rules of the `egress` chain (after it, the forward chain's policy drops)."""
    rules: list[str] = []
    if policy.mode == "none":
        return rules
    rules.append(f'iifname "{UPLINK}" oifname "{TAP}" ct state established,related accept')
    rules.append(f'iifname "{TAP}" oifname "{UPLINK}" ct state established,related accept')
    out = f'iifname "{TAP}" oifname "{UPLINK}" ct state new'
    if policy.mode == "full":
        rules.append(f"{out} ip daddr @denied drop")
        rules.append(f"{out} accept")
        return rules
    for rule in policy.rules:
        if rule.ports:
            ports = ", ".join(str(p) for p in rule.ports)
            rules.append(f"{out} ip daddr {rule.network} {rule.protocol} dport {{ {ports} }} accept")
        else:
            rules.append(f"{out} ip daddr {rule.network} meta l4proto {rule.protocol} accept")
    return rules


def namespace_ruleset(policy: PinnedPolicy) -> str:
    """The whole table of a new sandbox namespace. Its `output` chain is for what the namespace's own
    processes send (an escaped VMM lives there): nothing out of the uplink, where the policy in
    `forward` would never see it; the daemon's sockets in the namespace talk to the guest only."""
    denied = ", ".join(DENIED_RANGES)
    egress = "\n".join(f"    {r}" for r in _egress(policy))
    services = "\n".join(f"    {r}" for r in _services(policy))
    return f"""table inet {TABLE} {{
  set denied {{ type ipv4_addr; flags interval; elements = {{ {denied} }} }}
  counter refused {{ }}
  chain gate {{
  }}
  chain services {{
{services}
  }}
  chain input {{
    type filter hook input priority filter; policy drop;
    iifname "lo" accept
    jump gate
    iifname "{TAP}" ct state established,related accept
    jump services
    iifname "{TAP}" counter name "refused" drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    jump gate
    jump egress
    iifname "{TAP}" counter name "refused" drop
  }}
  chain egress {{
{egress}
  }}
  chain output {{
    type filter hook output priority filter; policy accept;
    oifname "{UPLINK}" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{UPLINK}" masquerade
  }}
}}
"""


def _services(policy: PinnedPolicy) -> list[str]:
    """What the guest may ask of its gateway itself: DNS (the relay), under `full` only."""
    if policy.mode != "full":
        return []
    return [f'iifname "{TAP}" udp dport 53 accept']


def egress_update(policy: PinnedPolicy, *, empty: bool = False) -> str:
    """Replace the policy atomically; `empty`: the chains are known empty, so only add (fast)."""
    lines = [] if empty else [f"flush chain inet {TABLE} egress", f"flush chain inet {TABLE} services"]
    lines += [f"add rule inet {TABLE} egress {r}" for r in _egress(policy)]
    lines += [f"add rule inet {TABLE} services {r}" for r in _services(policy)]
    return "\n".join(lines) + "\n"


def close_gate() -> str:
    return f"add rule inet {TABLE} gate counter drop\n"


def open_gate() -> str:
    return f"flush chain inet {TABLE} gate\n"


def host_ruleset() -> str:
    """The root namespace's shared table: the same for every sandbox, so it is never per-sandbox state.
    Loaded only where it is missing (daemons on one host share it)."""
    up = f'"{HOST_PREFIX}*"'
    return f"""table inet {TABLE} {{
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    iifname {up} drop
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    iifname {up} oifname {up} drop
    iifname {up} ip daddr 169.254.0.0/16 drop
    oifname {up} ct state established,related accept
    oifname {up} drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {UPLINK_POOL} oifname != {up} masquerade
  }}
}}
"""
