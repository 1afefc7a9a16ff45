"""Where Tartarus keeps things.

Two roots: the *cache* (artefacts rebuilt from inputs: kernels, agent, template images; safe to delete)
and the *state* directory (what the daemon owns right now: sandboxes, sockets; reconciled on start).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# The daemon's local admin key, in its state dir (and beside its socket): see daemon/auth.py.
LOCAL_KEY_FILE = "admin.key"


def cache_dir() -> Path:
    env = os.environ.get("TARTARUS_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "tartarus"


def state_dir() -> Path:
    env = os.environ.get("TARTARUS_STATE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME")
    return Path(xdg or Path.home() / ".local" / "state") / "tartarus"


def default_socket() -> Path:
    return state_dir() / "tartarus.sock"
