"""The daemon's settings: what `tartarus serve` and embedded runs choose, with the environment's defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tartarus.errors import InvalidArgument
from tartarus.policy import Policy, load_policy


def _pool_size_from_env() -> int:
    raw = os.environ.get("TARTARUS_POOL_SIZE", "2")
    try:
        size = int(raw)
    except ValueError:
        size = -1
    if not 0 <= size <= 64:
        raise InvalidArgument(f"TARTARUS_POOL_SIZE must be an integer from 0 to 64, not {raw!r}")
    return size


# Disk for hibernated sandboxes and checkpoints together when TARTARUS_HIBERNATE_QUOTA_MIB is not set:
# about 20 captures of a 1 GiB guest. On by default, so that captures cannot fill the state disk.
DEFAULT_HIBERNATE_QUOTA_MIB = 20 * 1024


def _quota_from_env() -> int | None:
    raw = os.environ.get("TARTARUS_HIBERNATE_QUOTA_MIB")
    if not raw:
        return DEFAULT_HIBERNATE_QUOTA_MIB * 2**20
    if raw == "unlimited":
        return None
    try:
        mib = int(raw)
    except ValueError:
        mib = -1
    if mib < 0:
        raise InvalidArgument(
            f"TARTARUS_HIBERNATE_QUOTA_MIB must be a number of MiB or 'unlimited', not {raw!r}"
        )
    return mib * 2**20


def _policy_from_env() -> Policy:
    path = os.environ.get("TARTARUS_POLICY")
    return load_policy(Path(path)) if path else Policy()


@dataclass(frozen=True)
class DaemonConfig:
    # Pre-started VMMs kept per template snapshot; 0 disables the pool (creates only get slower).
    pool_size: int = field(default_factory=_pool_size_from_env)
    # Disk that hibernated sandboxes and checkpoints may use together; None: no limit but the disk's.
    # TARTARUS_HIBERNATE_QUOTA_MIB=N|unlimited; unset: DEFAULT_HIBERNATE_QUOTA_MIB.
    hibernate_quota_bytes: int | None = field(default_factory=_quota_from_env)
    # Admission rules, limit caps, quarantine settings (TARTARUS_POLICY=FILE; default: admit all).
    policy: Policy = field(default_factory=_policy_from_env)
    # VMMs outlive the daemon, and a restarted daemon takes over the sandboxes it finds running
    # (`tartarus serve`). Off for embedded runs, whose VMMs die with them (parent-death signal).
    live_restore: bool = False
    # With live_restore: a clean stop leaves running sandboxes running too (restarts, upgrades).
    keep_on_stop: bool = False
    # The converted-image cache the images API uses; None: `<cache>/images`, shared with the CLI.
    image_root: Path | None = None
