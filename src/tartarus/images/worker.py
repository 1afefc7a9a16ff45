"""The conversion worker: a child process that applies layers and builds the filesystem.

Why a separate process: the staging filesystem is loop-mounted, and a mount made by a long-lived,
multi-threaded caller (the daemon) would outlive a crash of it. The worker runs under `unshare --mount`
with private propagation, so its mount is invisible to the rest of the host and disappears with it;
in that namespace everything but its work directory is read-only before it reads a layer (`seal.py`),
so a path-guard bug can damage only its own output. It also dies with its parent
(`PR_SET_PDEATHSIG`), and its peak memory is measurable on its own.

Protocol (JSON lines): the parent writes a job line, then one line per layer as each becomes available
(downloads run in the parent, in parallel) and an end line; the worker answers with progress lines and
then one result or error line. Errors carry the class name of an `ImageError` subclass, which the
parent raises again, so callers see the same typed errors as in-process code would raise.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from tartarus.images import errors
from tartarus.images.build import Staging
from tartarus.images.errors import BuildFailed, DigestMismatch, ImageError, TruncatedBlob
from tartarus.images.layers import LayerApplier, Limits
from tartarus.images.seal import seal_all_but
from tartarus.images.streams import LayerStream
from tartarus.private import CHILD_ENV

_PROGRESS_EVERY = 4 << 20
# Starts the worker without running `tartarus/__init__.py`, which loads the SDK (httpx, ~130 ms) that the
# worker never uses: a bare package module stands in for it. Startup is on a cold conversion's path.
_BOOT = """
import sys, types
package = types.ModuleType("tartarus")
package.__path__ = [sys.argv[1]]
sys.modules["tartarus"] = package
from tartarus.images.worker import main
sys.exit(main())
"""
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class LayerInput:
    """Where the builder reads one layer, and what it must hash to."""

    path: str  # a blob file, or a tarball holding `member`
    member: str | None
    digest: str | None  # of the stored (compressed) bytes; None when already verified or unknown
    size: int | None
    diff_id: str  # of the uncompressed tar: always verified
    what: str

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass(frozen=True)
class BuildResult:
    image: Path
    entries: int
    data_bytes: int
    warnings: list[str]
    warning_count: int
    loop: bool
    seconds: float


# ---- parent side -------------------------------------------------------------------------------


def _raise_from(error: dict[str, Any]) -> None:
    cls = getattr(errors, str(error.get("type")), None)
    message = str(error.get("message", "conversion failed"))
    if isinstance(cls, type) and issubclass(cls, ImageError):
        raise cls(message)
    raise BuildFailed(message)


def run_build(
    workdir: Path,
    fstype: str,
    layers: list[Future[LayerInput]],
    *,
    limits: Limits,
    loop: bool | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> BuildResult:
    """Run a worker that builds `workdir/rootfs.<fstype>` from `layers` (futures, applied in order)."""
    job = {
        "workdir": str(workdir),
        "fstype": fstype,
        "limits": limits.__dict__,
        "loop": loop,
        "parent": os.getpid(),
    }
    package = str(Path(__file__).resolve().parents[1])
    cmd = ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-c", _BOOT, package]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=CHILD_ENV
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stderr_tail: list[bytes] = []
    drain = threading.Thread(target=_tail, args=(proc.stderr, stderr_tail), daemon=True)
    drain.start()
    answers: list[dict[str, Any]] = []
    finished: Future[None] = Future()  # the worker closed its output: it is done or dead
    reader = threading.Thread(
        target=_read_answers, args=(proc.stdout, answers, on_bytes, on_stage, finished), daemon=True
    )
    reader.start()
    try:
        try:
            _send(proc.stdin, job)
            for future in layers:
                # A worker that failed on an early layer must not wait for every download to end.
                pending: list[Future[Any]] = [future, finished]
                wait(pending, return_when=FIRST_COMPLETED)
                if not future.done():
                    break
                _send(proc.stdin, {"layer": future.result().to_json()})
            else:
                _send(proc.stdin, {"end": True})
            proc.stdin.close()
        except BrokenPipeError:
            pass  # the worker stopped early: its answer says why
        reader.join()
        proc.wait()
        drain.join()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    for answer in answers:
        if "error" in answer:
            _raise_from(answer["error"])
        if "result" in answer:
            r = answer["result"]
            return BuildResult(
                image=Path(r["image"]),
                entries=r["entries"],
                data_bytes=r["data_bytes"],
                warnings=r["warnings"],
                warning_count=r["warning_count"],
                loop=r["loop"],
                seconds=r["seconds"],
            )
    tail = b"".join(stderr_tail).decode(errors="replace").strip()[-3000:]
    raise BuildFailed(f"image conversion worker exited with {proc.returncode}: {tail or 'no output'}")


def _send(stream: IO[bytes], message: dict[str, Any]) -> None:
    stream.write(json.dumps(message).encode() + b"\n")
    stream.flush()


def _tail(stream: IO[bytes], out: list[bytes]) -> None:
    for line in stream:
        out.append(line)
        if len(out) > 200:
            del out[:100]


def _read_answers(
    stream: IO[bytes],
    out: list[dict[str, Any]],
    on_bytes: Callable[[int], None] | None,
    on_stage: Callable[[str], None] | None,
    finished: Future[None],
) -> None:
    try:
        _read_lines(stream, out, on_bytes, on_stage)
    finally:
        finished.set_result(None)


def _read_lines(
    stream: IO[bytes],
    out: list[dict[str, Any]],
    on_bytes: Callable[[int], None] | None,
    on_stage: Callable[[str], None] | None,
) -> None:
    for line in stream:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if "progress" in message:
            if on_bytes:
                on_bytes(int(message["progress"]))
        elif "stage" in message:
            if on_stage:
                on_stage(str(message["stage"]))
        else:
            out.append(message)


# ---- worker side -------------------------------------------------------------------------------


class _Reporter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending = 0

    def say(self, message: dict[str, Any]) -> None:
        with self._lock:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

    def bytes(self, n: int) -> None:
        self._pending += n
        if self._pending >= _PROGRESS_EVERY:
            n, self._pending = self._pending, 0
            self.say({"progress": n})

    def flush(self) -> None:
        if self._pending:
            n, self._pending = self._pending, 0
            self.say({"progress": n})


@contextlib.contextmanager
def _open_layer(layer: LayerInput) -> Iterator[BinaryIO]:
    if layer.member is None:
        with open(layer.path, "rb", buffering=0) as f:
            yield cast(BinaryIO, f)
        return
    with tarfile.open(layer.path, "r:") as tf:
        member = tf.getmember(layer.member)
        stream = tf.extractfile(member)
        if stream is None:
            raise ImageError(f"{layer.what}: not a file in the archive")
        yield cast(BinaryIO, stream)


def _apply(applier: LayerApplier, layer: LayerInput, reporter: _Reporter) -> None:
    with _open_layer(layer) as raw:
        stream = LayerStream(
            raw,
            digest=layer.digest,
            size=layer.size,
            diff_id=layer.diff_id,
            what=layer.what,
            on_bytes=reporter.bytes,
        )
        try:
            try:
                applier.apply(cast(BinaryIO, stream), layer.what)
            except ImageError as e:
                # A tar that makes no sense may come from a corrupt blob: the digest check says which.
                try:
                    stream.finish()
                except (DigestMismatch, TruncatedBlob) as integrity:
                    raise integrity from e
                except ImageError:
                    pass
                raise
            stream.finish()
        finally:
            stream.close()
    reporter.flush()


def _work(job: dict[str, Any], lines: Iterator[str], reporter: _Reporter) -> dict[str, Any]:
    t0 = time.perf_counter()
    workdir = Path(job["workdir"])
    limits = Limits(**job["limits"])
    loop = job["loop"] if job["loop"] is not None else Path("/dev/loop-control").exists()
    staging = Staging(workdir, job["fstype"], limits, loop=loop)
    try:
        staging.__enter__()
    except BuildFailed as e:
        if job["loop"] is not None:
            raise
        print(f"loop mount unavailable ({e.message}); applying to a directory", file=sys.stderr)
        staging = Staging(workdir, job["fstype"], limits, loop=False)
        staging.__enter__()
    try:
        with LayerApplier(staging.root, limits) as applier:
            for line in lines:
                message = json.loads(line)
                if message.get("end"):
                    break
                _apply(applier, LayerInput(**message["layer"]), reporter)
            else:
                raise ImageError("conversion cancelled: the parent closed the job early")
            report = applier.finish()
        reporter.say({"stage": "build"})
        image = staging.finish(report)
    finally:
        staging.__exit__(None, None, None)
    return {
        "image": str(image),
        "entries": report.entries,
        "data_bytes": report.data_bytes,
        "warnings": report.warnings,
        "warning_count": report.warning_count,
        "loop": staging.loop,
        "seconds": time.perf_counter() - t0,
    }


def main() -> int:
    reporter = _Reporter()
    lines = iter(sys.stdin)
    try:
        job = json.loads(next(lines))
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != job["parent"]:
            return 1  # the parent died before we could ask to follow it
        seal_all_but(Path(job["workdir"]))  # before any layer byte: a guard bug can only hit the output
        reporter.say({"result": _work(job, lines, reporter)})
        return 0
    except ImageError as e:
        reporter.say({"error": {"type": type(e).__name__, "message": e.message}})
        return 1
    except OSError as e:
        reporter.say({"error": {"type": "BuildFailed", "message": f"conversion failed: {e}"}})
        return 1


if __name__ == "__main__":
    sys.exit(main())
