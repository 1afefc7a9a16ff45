"""Network namespaces, veth uplinks (iproute2, as root) and the host-wide allocation of uplink slots."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tartarus.errors import SandboxFailed, SetupRequired

NETNS_DIR = Path("/run/netns")
SLOTS_DIR = Path("/run/tartarus/net/slots")
SLOTS_LOCK = Path("/run/tartarus/net/slots.lock")
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


@contextlib.contextmanager
def _slots_locked() -> Iterator[None]:
    """Serialise stale-slot takeovers and releases host-wide: each is a read followed by an unlink, and
    two of them interleaving would unlink a claim another daemon has just made."""
    SLOTS_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(SLOTS_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _create_claim(path: Path, netns: str) -> bool:
    """Claim path with O_EXCL; False if someone holds it. The name is written after the create, so a
    reader may see an empty claim: that is a live one being made, never a stale one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(netns)
    return True


def _owner(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


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
        if _create_claim(path, netns):
            return slot
        owner = _owner(path)
        if owner is None:  # released since: try it again
            if _create_claim(path, netns):
                return slot
            continue
        if not owner or netns_path(owner).exists():
            continue
        with _slots_locked():
            if _owner(path) == owner:
                path.unlink()
            if _create_claim(path, netns):
                return slot
    raise SandboxFailed("no free network uplink slot (16384 sandboxes with network on this host)")


def release_slot(slot: int, netns: str) -> None:
    path = SLOTS_DIR / str(slot)
    with _slots_locked(), contextlib.suppress(OSError):
        if _owner(path) == netns:
            path.unlink()


def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()
