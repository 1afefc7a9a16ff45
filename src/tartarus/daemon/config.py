"""The daemon's settings: what `tartarus serve` and embedded runs choose, with the environment's defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tartarus.errors import InvalidArgument
from tartarus.policy import Policy, load_policy
from tartarus.sandbox.backend import Backend, parse_backend


def _pool_size_from_env() -> int:
    raw = os.environ.get("TARTARUS_POOL_SIZE", "2")
    try:
        size = int(raw)
    except ValueError:
        size = -1
    if not 0 <= size <= 64:
        raise InvalidArgument(f"TARTARUS_POOL_SIZE must be an integer from 0 to 64, not {raw!r}")
    return size


@dataclass(frozen=True)
class ReadySizes:
    """How many ready sandboxes (restored, distinct, warmed: `snapshots.ready`) to keep per template:
    `default` for every snapshotted template, `per_template` overriding it; 0 disables."""

    default: int = 0
    per_template: Mapping[str, int] = field(default_factory=dict)

    def of(self, template: str) -> int:
        return self.per_template.get(template, self.default)

    @classmethod
    def parse(cls, raw: str) -> ReadySizes:
        """`N` (every template) or `name=N,name=N` (others: 0), e.g. TARTARUS_READY_POOL=python-ds=2."""
        default, per_template = 0, {}
        for part in filter(None, (p.strip() for p in raw.split(","))):
            name, sep, number = part.rpartition("=")
            try:
                size = int(number)
            except ValueError:
                size = -1
            if not 0 <= size <= MAX_READY or (sep and not name):
                raise InvalidArgument(
                    f"TARTARUS_READY_POOL must be N or name=N,... with N from 0 to {MAX_READY}, not {raw!r}"
                )
            if sep:
                per_template[name] = size
            else:
                default = size
        return cls(default, per_template)


MAX_READY = 32


def _ready_pool_from_env() -> ReadySizes:
    return ReadySizes.parse(os.environ.get("TARTARUS_READY_POOL", "0"))


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


def _backend_from_env() -> Backend | None:
    raw = os.environ.get("TARTARUS_BACKEND", "").strip().lower()
    if raw in ("", "auto"):
        return None
    return parse_backend(raw, "TARTARUS_BACKEND (or auto)")


def _policy_from_env() -> Policy:
    path = os.environ.get("TARTARUS_POLICY")
    return load_policy(Path(path)) if path else Policy()


@dataclass(frozen=True)
class DaemonConfig:
    # Pre-started VMMs kept per template snapshot; 0 disables the pool (creates only get slower).
    pool_size: int = field(default_factory=_pool_size_from_env)
    # Ready sandboxes kept per template (TARTARUS_READY_POOL; default 0: off): a create that one can
    # serve binds it in milliseconds instead of restoring (`snapshots.ready`).
    ready_pool: ReadySizes = field(default_factory=_ready_pool_from_env)
    # Disk that hibernated sandboxes and checkpoints may use together; None: no limit but the disk's.
    # TARTARUS_HIBERNATE_QUOTA_MIB=N|unlimited; unset: DEFAULT_HIBERNATE_QUOTA_MIB.
    hibernate_quota_bytes: int | None = field(default_factory=_quota_from_env)
    # The backend of sandboxes whose create and template name none (TARTARUS_BACKEND=kvm|tcg|gvisor;
    # unset or `auto`: the host's VM backend, kvm if it boots, else tcg: see the README's "Backends").
    backend: Backend | None = field(default_factory=_backend_from_env)
    # Admission rules, limit caps, quarantine settings (TARTARUS_POLICY=FILE; default: admit all).
    policy: Policy = field(default_factory=_policy_from_env)
    # VMMs outlive the daemon, and a restarted daemon takes over the sandboxes it finds running
    # (`tartarus serve`). Off for embedded runs, whose VMMs die with them (parent-death signal).
    live_restore: bool = False
    # With live_restore: a clean stop leaves running sandboxes running too (restarts, upgrades).
    keep_on_stop: bool = False
    # The converted-image cache the images API uses; None: `<cache>/images`, shared with the CLI.
    image_root: Path | None = None
