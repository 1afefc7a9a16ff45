"""One sandbox's network: its namespace, TAP, uplink and current egress policy, and their removal.

Everything is set up when a VMM is prepared (for pooled VMMs, ahead of the create call) with the
policy `none`; a create that asks for more only swaps the namespace's `egress` chain, one `nft`
transaction. What exists is recorded in `<workdir>/net.json` *before* it is created, so a daemon that
dies at any point leaves enough for the next one to remove it (`reap`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from tartarus.network import libnft, nft
from tartarus.network.netns import (
    NETNS_PREFIX,
    claim_slot,
    link_exists,
    netns_path,
    release_slot,
    run,
    uplink_addresses,
)
from tartarus.network.policy import NONE, PinnedPolicy

log = logging.getLogger(__name__)

GUEST_ADDR = "198.18.0.2/30"
GATEWAY = "198.18.0.1"
GUEST_MAC = "52:54:00:00:00:02"  # every clone of a snapshot has it; harmless behind its own namespace
GUEST_KERNEL_ARG = f"tartarus.net={GUEST_ADDR},{GATEWAY}"
RECORD = "net.json"

_host_ready = False


def ensure_host() -> None:
    """Root-namespace part shared by all sandboxes: forwarding on, the shared nft table present."""
    global _host_ready
    if _host_ready:
        return
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    if f"table inet {nft.TABLE}" not in libnft.nft("list tables"):
        libnft.nft(nft.host_ruleset())
    _host_ready = True


@dataclass
class SandboxNetwork:
    netns: str
    slot: int
    policy: PinnedPolicy = NONE
    cut_off: bool = False

    @property
    def host_link(self) -> str:
        return f"{nft.HOST_PREFIX}{self.slot}"

    @property
    def netns_path(self) -> Path:
        return netns_path(self.netns)

    @classmethod
    def create(cls, workdir: Path, name: str | None = None) -> SandboxNetwork:
        """Namespace + TAP + uplink with the `none` policy. Removes what it made if any step fails."""
        ensure_host()
        netns = NETNS_PREFIX + (name or secrets.token_hex(6))
        record = workdir / RECORD
        record.write_text(json.dumps({"netns": netns, "slot": None}))
        run(["ip", "netns", "add", netns])
        network = cls(netns, -1)
        try:
            network.slot = claim_slot(netns)
            record.write_text(json.dumps({"netns": netns, "slot": network.slot}))
            host_addr, ns_addr = uplink_addresses(network.slot)
            link = network.host_link
            run(
                ["ip", "-batch", "-"],
                stdin=f"link add {link} type veth peer name {nft.UPLINK} netns {netns}\n"
                f"addr add {host_addr} dev {link}\nlink set {link} up\n",
            )
            run(
                ["ip", "-n", netns, "-batch", "-"],
                stdin=f"link set lo up\n"
                f"tuntap add dev {nft.TAP} mode tap\n"
                f"addr add {GATEWAY}/30 dev {nft.TAP}\n"
                f"link set {nft.TAP} up\n"
                f"addr add {ns_addr} dev {nft.UPLINK}\n"
                f"link set {nft.UPLINK} up\n"
                f"route add default via {host_addr.split('/')[0]}\n",
            )
            libnft.write_sysctl(network.netns_path, "net.ipv4.ip_forward", "1")
            libnft.nft(nft.namespace_ruleset(NONE), network.netns_path)
        except BaseException:
            network.destroy()
            raise
        return network

    async def apply(self, policy: PinnedPolicy) -> None:
        """Replace the egress policy atomically; takes effect on the next packet, flows included.
        From `none` (every pooled sandbox) this only adds rules: the fast path of a create."""
        empty = self.policy.mode == "none"
        await libnft.anft(nft.egress_update(policy, empty=empty), self.netns_path)
        self.policy = policy

    async def cut(self) -> None:
        """Drop every forwarded packet from now on, whatever the policy (quarantine)."""
        await libnft.anft(nft.close_gate(), self.netns_path)
        self.cut_off = True

    async def reconnect(self) -> None:
        await libnft.anft(nft.open_gate(), self.netns_path)
        self.cut_off = False

    def destroy(self) -> None:
        """Remove the uplink (both veth ends), the namespace (TAP and its nft table with it), the slot."""
        _remove(self.netns, self.slot)


def _remove(netns: str, slot: int | None) -> None:
    if slot is not None and slot >= 0:
        link = f"{nft.HOST_PREFIX}{slot}"
        if link_exists(link):
            with contextlib.suppress(Exception):
                run(["ip", "link", "del", link])
    if netns_path(netns).exists():
        try:
            run(["ip", "netns", "del", netns])
        except Exception:
            log.exception("could not delete network namespace %s", netns)
    if slot is not None and slot >= 0:
        release_slot(slot, netns)


def reap(workdir: Path) -> bool:
    """Remove a dead sandbox's network from its record; True if it had one."""
    try:
        data = json.loads((workdir / RECORD).read_text())
    except (OSError, ValueError):
        return False
    netns = data.get("netns")
    if not isinstance(netns, str) or not netns.startswith(NETNS_PREFIX):
        return False
    slot = data.get("slot")
    _remove(netns, slot if isinstance(slot, int) else None)
    return True
