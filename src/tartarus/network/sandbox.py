"""One sandbox's network: its namespace, TAP, uplink and current egress policy, and their removal.

Everything is set up when a VMM is prepared (for pooled VMMs, ahead of the create call) with the
policy `none`; a create that asks for more only swaps the namespace's `egress` chain, one `nft`
transaction. What exists is recorded in `<workdir>/net.json` *before* it is created, so a daemon that
dies at any point leaves enough for the next one to remove it (`reap`).

A gVisor sandbox has no TAP to hold: runsc's netstack adopts the interfaces of the namespace it runs
in, reading their addresses and routes and then sending through packet sockets, which no netfilter
hook of that namespace sees. So its NIC (`nic="veth"`) is a veth pair: the end named `tap0` stays in
the sandbox's namespace, where the VM's TAP would be, under the very same rules, and the other end,
`eth0`, carries the guest's address and default route in a namespace of its own (`<netns>-nic`) that
runsc runs in and takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tartarus.errors import SandboxFailed, SetupRequired
from tartarus.network import libnft, nft, tc
from tartarus.network.dns import DnsRelay
from tartarus.network.netns import (
    NETNS_PREFIX,
    OWNERS_DIR,
    SLOTS_DIR,
    claim_slot,
    link_exists,
    netns_path,
    release_slot,
    run,
    uplink_addresses,
)
from tartarus.network.policy import NONE, PinnedPolicy
from tartarus.private import write_private

log = logging.getLogger(__name__)

GUEST_ADDR = "198.18.0.2/30"
GATEWAY = "198.18.0.1"
GUEST_MAC = "52:54:00:00:00:02"  # every clone of a snapshot has it; harmless behind its own namespace
# The gateway (tap0) has one MAC everywhere too, so an ARP entry a clone inherits is never stale.
GATEWAY_MAC = "52:54:00:00:00:01"
GUEST_KERNEL_ARG = f"tartarus.net={GUEST_ADDR},{GATEWAY}"
RECORD = "net.json"
NIC_SUFFIX = "-nic"  # the gVisor sandbox's own namespace: <netns>-nic, holding the inner end of its veth
GUEST_NIC = "eth0"  # that inner end: the NIC the gVisor sandbox sees
NicKind = Literal["tap", "veth"]

_host_ready = False


def ensure_host() -> None:
    """Root-namespace part shared by all sandboxes: forwarding on, the shared nft table present."""
    global _host_ready
    if _host_ready:
        return
    try:
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    except PermissionError:
        raise SetupRequired(
            "sandbox networking needs root (network namespaces, TAPs, nftables): run the daemon as root"
        ) from None
    if f"table inet {nft.TABLE}" not in libnft.nft("list tables"):
        libnft.nft(nft.host_ruleset())
    _host_ready = True


@dataclass
class SandboxNetwork:
    netns: str
    slot: int
    policy: PinnedPolicy = NONE
    cut_off: bool = False
    nft: libnft.NftContext | None = None
    dns: DnsRelay | None = None
    nic: NicKind = "tap"

    @property
    def host_link(self) -> str:
        return f"{nft.HOST_PREFIX}{self.slot}"

    @property
    def netns_path(self) -> Path:
        return netns_path(self.netns)

    @property
    def nic_netns_path(self) -> Path:
        """The namespace a gVisor sandbox runs in (`nic="veth"` only): its NIC and nothing else."""
        if self.nic != "veth":
            raise SandboxFailed(f"network {self.netns} has a TAP for a VMM, not a namespace for gVisor")
        return netns_path(self.netns + NIC_SUFFIX)

    @classmethod
    def create(cls, workdir: Path, name: str | None = None, *, nic: NicKind = "tap") -> SandboxNetwork:
        """Namespace + NIC + uplink with the `none` policy. The NIC is a TAP for a VMM to open, or a
        veth pair whose inner end waits in a namespace of its own for a gVisor sandbox (`reset_nic`).
        Removes what it made if any step fails."""
        ensure_host()
        netns = NETNS_PREFIX + (name or secrets.token_hex(6))
        record = workdir / RECORD
        write_private(record, json.dumps({"netns": netns, "slot": None}))
        _register_owner(netns, workdir)
        run(["ip", "netns", "add", netns])
        network = cls(netns, -1, nic=nic)
        try:
            if nic == "veth":
                _register_owner(netns + NIC_SUFFIX, workdir)
                run(["ip", "netns", "add", netns + NIC_SUFFIX])
            network.slot = claim_slot(netns)
            write_private(record, json.dumps({"netns": netns, "slot": network.slot}))
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
                f"{_nic(netns, nic)}\n"
                f"link set {nft.TAP} address {GATEWAY_MAC}\n"
                f"addr add {GATEWAY}/30 dev {nft.TAP}\n"
                f"link set {nft.TAP} up\n"
                f"addr add {ns_addr} dev {nft.UPLINK}\n"
                f"link set {nft.UPLINK} up\n"
                f"route add default via {host_addr.split('/')[0]}\n",
            )
            libnft.write_sysctl(network.netns_path, "net.ipv4.ip_forward", "1")
            network.nft = libnft.NftContext(network.netns_path)
            network.nft.run(nft.namespace_ruleset(NONE))
            if nic == "veth":
                network.reset_nic()
        except BaseException:
            network.destroy()
            raise
        return network

    def reset_nic(self) -> None:
        """Give the gVisor NIC its address and default route (again): runsc takes both off the host's
        interface when its netstack adopts it, so every `runsc create` in this namespace needs them."""
        run(
            ["ip", "-n", self.nic_netns_path.name, "-batch", "-"],
            stdin=f"link set lo up\naddr replace {GUEST_ADDR} dev {GUEST_NIC}\nlink set {GUEST_NIC} up\n"
            f"route replace default via {GATEWAY}\n",
        )

    @classmethod
    def existing(cls, workdir: Path, policy: PinnedPolicy, *, cut_off: bool) -> SandboxNetwork:
        """The network an earlier daemon made for the sandbox in `workdir` (taking over a running
        sandbox); its rules are in the namespace already, `policy` and `cut_off` say what they are."""
        netns, slot = _read_record(workdir) or ("", None)
        if slot is None or not netns_path(netns).exists():
            raise SandboxFailed(f"the network namespace of {workdir.name} is gone")
        ensure_host()
        nic: NicKind = "veth" if netns_path(netns + NIC_SUFFIX).exists() else "tap"
        network = cls(netns, slot, policy, cut_off, nic=nic)
        network.nft = libnft.NftContext(network.netns_path)
        return network

    async def release(self) -> None:
        """Let go of the namespace without removing it (its sandbox runs on for the next daemon): stop
        what the daemon serves into it and drop the context whose socket keeps it open."""
        await self.close_services()
        if self.nft is not None:
            self.nft.close()
            self.nft = None

    async def resume_services(self) -> None:
        """Start again what the daemon serves into the namespace (the DNS relay of `full`)."""
        if self.policy.mode == "full" and self.dns is None:
            self.dns = DnsRelay(self.netns_path, GATEWAY)
            await self.dns.start()

    def _ctx(self) -> libnft.NftContext:
        if self.nft is None:
            raise SandboxFailed(f"network of {self.netns} is gone")
        return self.nft

    async def apply(self, policy: PinnedPolicy) -> None:
        """Replace the egress policy atomically; takes effect on the next packet, flows included.
        From `none` (every pooled sandbox) this only adds rules, inline: the fast path of a create."""
        if policy.mode == "full" and self.dns is None:
            self.dns = DnsRelay(self.netns_path, GATEWAY)
            await self.dns.start()
        if self.policy.mode == "none":
            self._ctx().run(nft.egress_update(policy, empty=True))
        else:
            await self._ctx().arun(nft.egress_update(policy))
        self.policy = policy

    def cut(self) -> None:
        """Drop every forwarded packet from the next one on, whatever the policy (quarantine).
        One rule added, inline: nothing can run between the call and the cut."""
        self._ctx().run(nft.close_gate())
        self.cut_off = True

    async def shape(self, egress_bytes_per_s: int | None, ingress_bytes_per_s: int | None) -> None:
        """Set the guest's egress and ingress rates (None: unlimited), live; one `tc` batch, on a thread."""
        argv = ["tc", "-n", self.netns, "-batch", "-"]
        await asyncio.to_thread(run, argv, tc.shaping(egress_bytes_per_s, ingress_bytes_per_s))

    async def reconnect(self) -> None:
        await self._ctx().arun(nft.open_gate())
        self.cut_off = False

    async def close_services(self) -> None:
        """Stop what the daemon serves into the namespace (the DNS relay)."""
        if self.dns is not None:
            await self.dns.close()
            self.dns = None

    def refused(self) -> int:
        """Packets from the guest that the namespace dropped (for the port-scan trigger)."""
        out = self._ctx().run(f"list counter inet {nft.TABLE} refused")
        return int(out.split("packets", 1)[1].split()[0]) if "packets" in out else 0

    def destroy(self) -> None:
        """Remove the uplink (both veth ends), the namespace (NIC and its nft table with it), the NIC's
        namespace if it has one, the slot."""
        if self.nft is not None:
            self.nft.close()  # its socket would keep the namespace alive
            self.nft = None
        _remove(self.netns, self.slot)


def _nic(netns: str, kind: NicKind) -> str:
    """The `ip` command that makes the NIC's outer end, `tap0`, in the sandbox's namespace."""
    if kind == "tap":
        return f"tuntap add dev {nft.TAP} mode tap"
    inner = netns + NIC_SUFFIX
    return f"link add {nft.TAP} type veth peer name {GUEST_NIC} address {GUEST_MAC} netns {inner}"


def _register_owner(netns: str, workdir: Path) -> None:
    """Host-wide: which directory a namespace belongs to, so that one whose directory vanished (its
    daemon crashed and the directory was deleted, a test's temporary dir) can be found and removed."""
    OWNERS_DIR.mkdir(parents=True, exist_ok=True)
    (OWNERS_DIR / netns).write_text(str(workdir.resolve()))


def reap_orphans() -> list[str]:
    """Remove every sandbox namespace (with its uplink, slot and cgroups) whose owning directory is gone,
    whichever daemon or state dir made it. Returns the namespaces removed."""
    from tartarus.limits.cgroups import reap as reap_cgroup

    removed: list[str] = []
    if not OWNERS_DIR.exists():
        return removed
    for owner in OWNERS_DIR.iterdir():
        try:
            workdir = Path(owner.read_text().strip())
        except OSError:
            continue
        if workdir.exists() or not owner.name.startswith(NETNS_PREFIX):
            continue
        _remove(owner.name, _slot_of(owner.name))
        reap_cgroup(workdir.name)
        owner.unlink(missing_ok=True)
        removed.append(owner.name)
    if removed:
        log.warning("removed %d namespaces whose sandbox directory is gone: %s", len(removed), removed)
    return removed


def _slot_of(netns: str) -> int | None:
    for path in SLOTS_DIR.glob("*") if SLOTS_DIR.exists() else []:
        with contextlib.suppress(OSError, ValueError):
            if path.read_text().strip() == netns:
                return int(path.name)
    return None


def _remove(netns: str, slot: int | None) -> None:
    if slot is not None and slot >= 0:
        link = f"{nft.HOST_PREFIX}{slot}"
        if link_exists(link):
            with contextlib.suppress(Exception):
                run(["ip", "link", "del", link])
    for name in (netns, netns + NIC_SUFFIX):
        if netns_path(name).exists():
            try:
                run(["ip", "netns", "del", name])
            except Exception:
                log.exception("could not delete network namespace %s", name)
    if slot is not None and slot >= 0:
        release_slot(slot, netns)
    for name in (netns, netns + NIC_SUFFIX):
        with contextlib.suppress(OSError):
            (OWNERS_DIR / name).unlink()


def _read_record(workdir: Path) -> tuple[str, int | None] | None:
    """(namespace, slot or None if not claimed yet) from a sandbox's record; None without a valid one."""
    try:
        data = json.loads((workdir / RECORD).read_text())
    except (OSError, ValueError):
        return None
    netns = data.get("netns") if isinstance(data, dict) else None
    if not isinstance(netns, str) or not netns.startswith(NETNS_PREFIX):
        return None
    slot = data.get("slot")
    return netns, slot if isinstance(slot, int) else None


def reap(workdir: Path) -> bool:
    """Remove a dead sandbox's network from its record; True if it had one."""
    record = _read_record(workdir)
    if record is None:
        return False
    _remove(*record)
    return True
