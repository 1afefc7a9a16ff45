"""Where a daemon keeps sandboxes in each state, under its state directory."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from tartarus.sealing import EnvSeal


@dataclass(frozen=True)
class Layout:
    """All on one filesystem, so that moving a sandbox between states is a rename."""

    state_dir: Path

    @property
    def sandboxes(self) -> Path:
        return self.state_dir / "sandboxes"

    @property
    def hibernated(self) -> Path:
        return self.state_dir / "hibernated"

    @property
    def checkpoints(self) -> Path:
        return self.state_dir / "checkpoints"

    @property
    def pins(self) -> Path:
        return self.state_dir / "pins"

    @functools.cached_property
    def seal(self) -> EnvSeal:
        """What seals the env in saved sandbox records (and sandbox descriptors): the state dir's key."""
        return EnvSeal.for_state_dir(self.state_dir)
