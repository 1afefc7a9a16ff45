"""Build-once artefacts keyed by the hash of their inputs.

An artefact lives in `<cache>/<kind>/<key>/`; it is built in a temporary sibling directory and renamed
into place, so a crash mid-build never leaves a half artefact that looks finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tartarus.paths import cache_dir


def digest(parts: Iterable[bytes | str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part
        h.update(len(raw).to_bytes(8, "big"))
        h.update(raw)
    return h.hexdigest()[:24]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached(kind: str, key: str, build: Callable[[Path], object]) -> Path:
    """Return the directory of artefact `kind/key`, building it with `build(tmpdir)` if absent.

    Concurrent callers (two set-ups, a test run beside a daemon) build it once: the second waits.
    """
    root = cache_dir() / kind
    final = root / key
    if final.is_dir():
        return final
    with _locked(root / f".{key}.lock"):
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            build(tmp)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
