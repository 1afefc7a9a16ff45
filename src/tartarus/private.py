"""The state dir is the daemon's alone: 0700 directories, 0600 files, whatever `TARTARUS_STATE_DIR` is.

It holds sandboxes' env, guest RAM (hibernation and checkpoint images) and guest disks (layers): data of
tenants that no other local user may read. The root's mode is what keeps them out; file modes are the
second wall (a root made readable by mistake, a file moved out). New files are private because the
daemon creates them so (`PRIVATE_FILE`, and QEMU runs under `QEMU_UMASK`); what an older version left
is tightened when a daemon takes the directory over.

No process-wide umask: the daemon also converts images and builds cache artefacts whose modes end up
in guests (an image layer's implicit directories are made 0755 by mode, not by fchmod), and an embedded
daemon shares its process with the command that started it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
QEMU_UMASK = 0o077  # what QEMU creates in a sandbox's directory (its console log) is private too
# The daemon's environment is private too: it may hold the database's password or the object store's
# keys. What runs hostile input (a VMM, runsc, the image worker) gets this, and nothing of the daemon's.
CHILD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def make_private(state_dir: Path) -> None:
    """Create `state_dir` 0700 (its parents as usual), or take group and other bits off it and off
    everything under it (an older version's 0755/0644). Symlinks are skipped, never followed."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    os.chmod(state_dir, PRIVATE_DIR)
    for parent, dirs, files in os.walk(state_dir):
        for name in (*dirs, *files):
            _tighten(Path(parent) / name)


def _tighten(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):  # a file a sandbox's VMM removed meanwhile
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode) or not mode & 0o077:
            return
        try:
            os.chmod(path, stat.S_IMODE(mode) & ~0o077)
        except PermissionError:  # not ours (a shared cache file a pin links to): the root still hides it
            log.warning("could not make %s private to the daemon", path)


def opener(path: str, flags: int) -> int:
    """For `open(..., opener=opener)`: a file it creates is 0600 whatever the umask."""
    return os.open(path, flags | os.O_CLOEXEC, PRIVATE_FILE)


def write_private(path: Path, data: str | bytes) -> None:
    with open(path, "wb", opener=opener) as f:
        f.write(data.encode() if isinstance(data, str) else data)
