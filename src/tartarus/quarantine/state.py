"""What a sandbox records while quarantined: kept apart from `actions` so the sandbox that holds it
(runtime/sandbox.py) and its descriptor need not import the code that confines it, which imports them."""

from __future__ import annotations

from dataclasses import dataclass

from tartarus.limits.spec import Limits


@dataclass
class QuarantineState:
    since: float
    reason: str
    by: str  # "admission[:rule]", "operator:<key id>@<tenant>", "trigger:<what>"
    limits: Limits | None  # restored on release
