"""Named points where a test can make a multi-step operation fail, to prove it never leaves half a state.

`TARTARUS_FAILPOINTS="hibernate.state_saved=raise,wake.loaded=exit"` arms them for a process: `raise`
throws at that point (a failing step, the daemon lives on), `exit` ends the process at once without any
cleanup (a daemon killed with -9). Tests may also arm them in process with `arm()`. Unarmed points cost a
dict lookup.
"""

from __future__ import annotations

import os

_armed: dict[str, str] = {}


class FailpointError(RuntimeError):
    """Raised by an armed `raise` failpoint."""


def _load() -> None:
    for item in filter(None, os.environ.get("TARTARUS_FAILPOINTS", "").split(",")):
        name, _, action = item.partition("=")
        arm(name.strip(), action.strip() or "raise")


def arm(name: str, action: str = "raise") -> None:
    if action not in ("raise", "exit"):
        raise ValueError(f"failpoint action must be raise or exit, not {action!r}")
    _armed[name] = action


def disarm(name: str | None = None) -> None:
    if name is None:
        _armed.clear()
    else:
        _armed.pop(name, None)


def hit(name: str) -> None:
    action = _armed.get(name)
    if action == "raise":
        raise FailpointError(f"failpoint {name}")
    if action == "exit":
        os._exit(137)


_load()
