"""E2B's own SDKs, unmodified, in venvs of their own under the cache dir, keyed by their pinned
versions: their dependencies never constrain Tartarus's, and a change of pins builds a new venv beside
the old. Two releases are pinned: the newest (e2b-sdk-requirements.txt) and the oldest Tartarus supports
(e2b-sdk-oldest-requirements.txt). The conformance suite (tests/e2b_compat) and `bench e2b` drive them;
either builds a venv on first use (it needs PyPI); `python -m tartarus.bench.e2b_sdk [newest|oldest]`
builds one ahead."""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from tartarus.paths import cache_dir

REQUIREMENTS = Path(__file__).with_name("e2b-sdk-requirements.txt")
RELEASES = {"newest": REQUIREMENTS, "oldest": Path(__file__).with_name("e2b-sdk-oldest-requirements.txt")}


def sdk_python(release: str = "newest") -> Path:
    """The interpreter of the venv holding `release`'s pins, building the venv first if they have none
    yet."""
    requirements = RELEASES[release]
    pins = requirements.read_bytes()
    key = hashlib.sha256(pins + sys.version.encode()).hexdigest()[:16]
    root = cache_dir() / "e2b-sdk"
    venv = root / key
    python = venv / "bin" / "python"
    ready = venv / ".ready"
    if ready.exists():
        return python
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs build it once
        if ready.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)  # a build that died half-way
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "-r",
                str(requirements),
            ],
            check=True,
        )
        ready.touch()
    return python


if __name__ == "__main__":
    print(sdk_python(*sys.argv[1:2]))
