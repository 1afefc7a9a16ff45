"""Run hostile-image code where a broken escape guard cannot damage the machine.

The hostile-layer tests apply archives built to escape their root, as root. Aiming them at canaries
is not enough: a regression in the guard would still write wherever a test's paths lead. `jailed`
runs the code in a child process with its own mount namespace (`unshare --mount`, private
propagation) sealed as the conversion worker seals its own (`tartarus.images.seal`): every mount
read-only except the `writable` directories, bind-mounted read-write over themselves. An escape can
then only reach those directories (where the tests keep canaries to see it) or fail with EROFS; the
rest of the machine is out of reach either way. Result and exception come back pickled, so callers
use it like a plain call.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

R = TypeVar("R")

# The child: make every mount read-only, then the writable directories read-write again (the conversion
# worker's own seal, images/seal.py), then run the pickled call. A failed seal aborts before the call runs.
_RUNNER = r"""
import os, pickle, sys, traceback
from pathlib import Path
from tartarus.images.seal import seal_all_but
writable, fn, args, kwargs = pickle.load(sys.stdin.buffer)
seal_all_but(*map(Path, writable))
os.environ["TMPDIR"] = writable[0]
try:
    out = ("ok", fn(*args, **kwargs))
except BaseException as e:
    out = ("err", e)
try:
    data = pickle.dumps(out)
except Exception:
    data = pickle.dumps(("err", RuntimeError(traceback.format_exception(out[1]))))
sys.stdout.buffer.write(data)
"""


def jailed(writable: list[Path], fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """`fn(*args, **kwargs)` in a child whose only writable places are `writable` (the rest of every mount is
    read-only to it); its exception is raised here. `fn` and its arguments must pickle (`fn` importable)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    job = pickle.dumps(([str(p) for p in writable], fn, args, kwargs))
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-c", _RUNNER],
        input=job,
        capture_output=True,
        env=env,
        timeout=100,
    )
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"jailed child failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    kind, value = pickle.loads(proc.stdout)
    if kind == "err":
        raise cast(BaseException, value)
    return cast(R, value)


def write_file(path: Path, data: bytes) -> None:
    """Used by the jail's own test: a write the jail must refuse or allow."""
    path.write_bytes(data)
