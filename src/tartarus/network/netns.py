"""Network namespaces, veth uplinks (iproute2, as root) and the host-wide allocation of uplink slots."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import subprocess
from pathlib import Path

from tartarus.errors import SandboxFailed, SetupRequired

NETNS_DIR = Path("/run/netns")
SLOTS_DIR = Path("/run/tartarus/net/slots")
OWNERS_DIR = Path("/run/tartarus/net/owners")  # <netns> -> the sandbox directory it belongs to
SLOTS = 16384  # /30 uplinks in UPLINK_POOL
NETNS_PREFIX = "tartarus-"


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def run(argv: list[str], stdin: str | None = None) -> None:
    """Run a command; raise with its stderr if it fails."""
    try:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise SetupRequired(f"{argv[0]} is not installed: run ./scripts/setup") from e
    if result.returncode != 0:
        raise SandboxFailed(f"{' '.join(argv)} failed: {result.stderr.strip() or result.returncode}")


def uplink_addresses(slot: int) -> tuple[str, str]:
    """(root end, namespace end) of slot's /30 in the uplink pool."""
    from tartarus.network.nft import UPLINK_POOL

    base = ipaddress.ip_network(UPLINK_POOL).network_address + 4 * slot
    return f"{base + 1}/30", f"{base + 2}/30"


def claim_slot(netns: str) -> int:
    """Claim a free uplink slot host-wide (a file created O_EXCL; other daemons see it too).

    A slot whose owner namespace no longer exists is stale (its daemon died before reaping) and is
    taken over; namespaces are created before their slot is claimed, so a live claim is never stale.
    """
    SLOTS_DIR.mkdir(parents=True, exist_ok=True)
    start = random.randrange(SLOTS)
    for i in range(SLOTS):
        slot = (start + i) % SLOTS
        path = SLOTS_DIR / str(slot)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):
                owner = path.read_text().strip()
                if owner and not netns_path(owner).exists():
                    path.unlink()
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                else:
                    continue
        with os.fdopen(fd, "w") as f:
            f.write(netns)
        return slot
    raise SandboxFailed("no free network uplink slot (16384 sandboxes with network on this host)")


def release_slot(slot: int, netns: str) -> None:
    path = SLOTS_DIR / str(slot)
    with contextlib.suppress(OSError):
        if path.read_text().strip() == netns:
            path.unlink()


def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()
