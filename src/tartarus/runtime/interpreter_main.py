"""The warm code interpreter that runs *inside* a sandbox (copied into the guest; stdlib only).

Started once when a template is snapshotted, with its heavy imports already done, so every sandbox
restored from the snapshot answers `run_code` at once. It speaks newline-delimited JSON on its stdin and
on a private duplicate of its original stdout; fd 1 and 2 are pointed elsewhere so that neither user code
nor its subprocesses can corrupt the channel. State (globals) persists between calls, like a notebook.

Request:  {"id": 1, "code": "df.describe()"}            or {"id": 2, "reseed": true}
Response: {"id": 1, "stdout": "...", "stderr": "...", "result": "<repr>" | null,
           "error": null | {"name": ..., "value": ..., "traceback": ...}}
"""

from __future__ import annotations

import ast
import contextlib
import gc
import importlib
import io
import json
import os
import random
import signal
import sys
import traceback
from collections.abc import Iterator
from typing import Any

MAX_OUTPUT = 1 << 20  # per stream per call; the rest is dropped with a marker


class _Capture(io.StringIO):
    def getvalue_capped(self) -> str:
        value = self.getvalue()
        if len(value) > MAX_OUTPUT:
            return value[:MAX_OUTPUT] + f"\n[... {len(value) - MAX_OUTPUT} characters dropped]\n"
        return value


_executing = False


def _interrupt(signum: int, frame: object) -> None:
    """SIGINT interrupts a running cell (a host-side timeout), never the idle interpreter."""
    if _executing:
        raise KeyboardInterrupt


def _execute(code: str, namespace: dict[str, Any]) -> object:
    """Run a cell; return the value of its last line if that line is an expression (like Jupyter)."""
    try:
        # A cell that is one expression compiles straight from source, without building the Python AST
        # objects below: much less interpreter code to run, which matters on a freshly restored guest.
        expression = compile(code, "<cell>", "eval")
    except SyntaxError:
        pass
    else:
        return eval(expression, namespace)
    tree = ast.parse(code, "<cell>", "exec")
    last = tree.body[-1] if tree.body else None
    if not isinstance(last, ast.Expr):
        exec(compile(tree, "<cell>", "exec"), namespace)
        return None
    tree.body.pop()
    exec(compile(tree, "<cell>", "exec"), namespace)
    return eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)


def _run(code: str, namespace: dict[str, Any]) -> dict[str, Any]:
    global _executing
    out, err = _Capture(), _Capture()
    result: str | None = None
    error: dict[str, str] | None = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        _executing = True
        try:
            value = _execute(code, namespace)
            if value is not None:
                namespace["_"] = value
                result = repr(value)
        except BaseException as e:  # user code may raise anything, SystemExit included
            error = {
                "name": type(e).__name__,
                "value": str(e),
                "traceback": "".join(traceback.format_exception(e)),
            }
        finally:
            _executing = False
    return {
        "stdout": out.getvalue_capped(),
        "stderr": err.getvalue_capped(),
        "result": result,
        "error": error,
    }


def _reseed(namespace: dict[str, Any]) -> None:
    """After a snapshot restore every clone holds the same PRNG states: draw fresh ones."""
    fresh = os.urandom(36)
    random.seed(int.from_bytes(fresh[:32], "little"))  # an int seed skips hashing a bytes one
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(int.from_bytes(fresh[32:], "little"))


def _lines(fd: int) -> Iterator[bytes]:
    """Newline-delimited requests read straight from the fd: no text-layer machinery to run."""
    pending = b""
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            yield line


def _send(fd: int, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode() + b"\n"
    while data:
        data = data[os.write(fd, data) :]


def main() -> None:
    signal.signal(signal.SIGINT, _interrupt)
    channel = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    preload = [m for m in os.environ.get("TARTARUS_PRELOAD", "").split(",") if m]
    for module in preload:
        namespace[module.split(".")[0]] = importlib.import_module(module)
    if "pandas" in preload:
        namespace["pd"] = sys.modules["pandas"]
    if "numpy" in preload:
        namespace["np"] = sys.modules["numpy"]
    # Move everything imported so far out of the collector's sight: a collection after a restore would
    # otherwise walk (and dirty) every preloaded object, costing time and copy-on-write memory.
    gc.collect()
    gc.freeze()
    _send(channel, {"ready": True, "preloaded": preload})
    for line in _lines(0):
        try:
            request = json.loads(line)
            rid = request["id"]
        except (ValueError, KeyError, TypeError):
            _send(channel, {"id": None, "error": {"name": "ProtocolError", "value": repr(line[:200])}})
            continue
        if request.get("reseed"):
            _reseed(namespace)
        _send(channel, {"id": rid, **_run(str(request.get("code", "")), namespace)})


if __name__ == "__main__":
    main()
