"""The warm code interpreter that runs *inside* a sandbox (copied into the guest; stdlib only).

Started once when a template is snapshotted, with its heavy imports already done, so every sandbox
restored from the snapshot answers `run_code` at once. It speaks newline-delimited JSON on its stdin and
on a private duplicate of its original stdout; fd 1 and 2 are pointed elsewhere so that neither user code
nor its subprocesses can corrupt the channel. State (globals) persists between calls, like a notebook.

Contexts are separate notebooks in this one process: each has its own globals, working directory and
execution count (imported modules are shared, as they are one Python). "default" always exists.

Request:  {"id": 1, "code": "df.describe()", "context"?: "default", "env"?: {...}}
          {"id": 2, "reseed": true}
          {"id": 3, "op": "create_context" | "list_contexts" | "delete_context" | "restart_context",
           "context"?: ID, "cwd"?: PATH}
Response: {"id": 1, "stdout": "...", "stderr": "...", "result": "<repr>" | null,
           "results": [{"text"?, "html"?, "png"? (base64), ..., "is_main_result": bool}],
           "execution_count": N, "error": null | {"name": ..., "value": ..., "traceback": ...}}
          {"id": 3, "context": {"id", "language", "cwd"}} | {"id": 3, "contexts": [...]} | {"id": 3}
          {"id": 3, "fault": {"code": "not_found" | "invalid_argument", "message": ...}}
Rich results are what Jupyter would display: the last expression's `_repr_*_` formats (a DataFrame's
HTML), matplotlib figures left open or passed to `plt.show()` / `display()` (PNG).
"""

from __future__ import annotations

import ast
import base64
import contextlib
import gc
import importlib
import inspect
import io
import json
import os
import random
import secrets
import signal
import sys
import traceback
from collections.abc import Iterator
from typing import Any

MAX_OUTPUT = 1 << 20  # per stream per call; the rest is dropped with a marker
MAX_RESULTS = 4 << 20  # bytes of rich results per call; later ones shrink to a note saying so
DEFAULT_CONTEXT = "default"
MAX_CONTEXTS = 64
# Jupyter's display formats, as E2B's results name them, and the method that yields each.
FORMATS = (
    ("html", "_repr_html_"),
    ("markdown", "_repr_markdown_"),
    ("svg", "_repr_svg_"),
    ("png", "_repr_png_"),
    ("jpeg", "_repr_jpeg_"),
    ("pdf", "_repr_pdf_"),
    ("latex", "_repr_latex_"),
    ("json", "_repr_json_"),
    ("javascript", "_repr_javascript_"),
)
BINARY = {"png", "jpeg", "pdf"}
PLAIN = {int, float, complex, bool, str, bytes, list, tuple, dict, set, frozenset, range, type(None)}
MIME = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
}


class _Capture(io.StringIO):
    def getvalue_capped(self) -> str:
        value = self.getvalue()
        if len(value) > MAX_OUTPUT:
            return value[:MAX_OUTPUT] + f"\n[... {len(value) - MAX_OUTPUT} characters dropped]\n"
        return value


class Context:
    """One notebook: its globals, working directory and count of cells run."""

    def __init__(self, context_id: str, cwd: str, preloaded: dict[str, Any]) -> None:
        self.id = context_id
        self.cwd = cwd
        self.preloaded = preloaded
        self.namespace: dict[str, Any] = {}
        self.count = 0
        self.restart()

    def restart(self) -> None:
        self.namespace = {"__name__": "__main__", "display": display, **self.preloaded}
        self.count = 0

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "language": "python", "cwd": self.cwd}


_executing = False
_displayed: list[dict[str, Any]] = []  # the current cell's display() calls and shown figures


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


def _figure_png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _is_figure(value: object) -> bool:
    figure_module = sys.modules.get("matplotlib.figure")
    return figure_module is not None and isinstance(value, figure_module.Figure)


def _format(fmt: str, data: object) -> object | None:
    """One format's data as JSON carries it: images base64, JSON as is, the rest as text."""
    if isinstance(data, tuple):  # IPython allows (data, metadata)
        data = data[0] if data else None
    if data is None:
        return None
    if fmt in BINARY:
        return base64.b64encode(data).decode() if isinstance(data, bytes) else str(data)
    if fmt == "json":
        try:
            json.dumps(data)
        except (TypeError, ValueError):
            return None
        return data
    return data.decode() if isinstance(data, bytes) else str(data)


def bundle(value: object) -> dict[str, Any]:
    """Every format Jupyter would display `value` in; `text` (its repr) always."""
    out: dict[str, Any] = {"text": repr(value)}
    # Builtins display as text only: skip the lookups (the first call after a restore pays for every
    # page it touches). A class's _repr_html_ is an unbound function, not its display.
    if type(value) in PLAIN or inspect.isclass(value):
        return out
    if _is_figure(value):
        out["png"] = _figure_png(value)
        return out
    mimebundle = getattr(value, "_repr_mimebundle_", None)
    if callable(mimebundle):
        with contextlib.suppress(Exception):
            found = mimebundle()
            found = found[0] if isinstance(found, tuple) else found
            for mime, data in (found or {}).items():
                fmt = MIME.get(mime)
                if fmt is not None and fmt != "text" and (formatted := _format(fmt, data)) is not None:
                    out[fmt] = formatted
    for fmt, method in FORMATS:
        render = getattr(value, method, None)
        if fmt in out or not callable(render):
            continue
        try:
            formatted = _format(fmt, render())
        except Exception:  # a broken _repr_ shows as text only, as in Jupyter
            continue
        if formatted is not None:
            out[fmt] = formatted
    return out


def display(*values: object) -> None:
    """Jupyter's `display()`: each value is a result of the cell (not its main one)."""
    for value in values:
        _displayed.append(bundle(value))


def _show(*args: object, **kwargs: object) -> None:
    """`plt.show()` with no screen: every open figure becomes a result of the cell, then closes."""
    _flush_figures()


def _flush_figures() -> None:
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    for number in pyplot.get_fignums():
        figure = pyplot.figure(number)
        _displayed.append(bundle(figure))
        pyplot.close(figure)


def _patch_pyplot() -> None:
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None and pyplot.show is not _show:
        pyplot.show = _show  # type: ignore[attr-defined]


def _capped(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    kept, total = [], 0
    for result in results:
        size = sum(len(v) if isinstance(v, str) else 64 for v in result.values())
        if "json" in result:
            size += len(json.dumps(result["json"]))
        if total + size > MAX_RESULTS:
            note = f"[a result of {size} bytes dropped: over the {MAX_RESULTS} bytes a call may return]"
            result = {"text": note, "is_main_result": result["is_main_result"]}
            size = len(note)
        total += size
        kept.append(result)
    return kept


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """E2B's per-execution env vars: set for the cell, then put back as they were."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run(code: str, context: Context, env: dict[str, str]) -> dict[str, Any]:
    """One cell. Its results in Jupyter's order: `display()` calls as they came, the main result,
    then the figures left open (shown at the cell's end, as the inline backend does)."""
    global _executing
    out, err = _Capture(), _Capture()
    result: str | None = None
    main: list[dict[str, Any]] = []
    error: dict[str, str] | None = None
    _displayed.clear()
    _patch_pyplot()
    context.count += 1
    during = 0
    environment = _environment(env) if env else contextlib.nullcontext()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), environment:
        _executing = True
        try:
            with contextlib.suppress(OSError):
                os.chdir(context.cwd)
            try:
                value = _execute(code, context.namespace)
                if value is not None:
                    context.namespace["_"] = value
                    result = repr(value)
                    main.append({**bundle(value), "is_main_result": True})
                    if _is_figure(value):  # shown as the main result: not again among the open ones
                        sys.modules["matplotlib.pyplot"].close(value)
            except BaseException as e:  # user code may raise anything, SystemExit included
                error = {
                    "name": type(e).__name__,
                    "value": str(e),
                    "traceback": "".join(traceback.format_exception(e)),
                }
            during = len(_displayed)
            _patch_pyplot()  # pyplot imported by this cell
            _flush_figures()
        except BaseException as e:  # a figure that fails to render, or an interrupt meanwhile
            print(f"[figures not shown: {type(e).__name__}: {e}]", file=sys.stderr)
        finally:
            _executing = False
            context.cwd = os.getcwd()
    shown = [{**r, "is_main_result": False} for r in _displayed]
    _displayed.clear()
    return {
        "stdout": out.getvalue_capped(),
        "stderr": err.getvalue_capped(),
        "result": result,
        "results": _capped(shown[:during] + main + shown[during:]),
        "execution_count": context.count,
        "error": error,
    }


def _reseed() -> None:
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


class Fault(Exception):
    """A request this interpreter refuses: its code says why (not_found, invalid_argument)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Interpreter:
    """The contexts, and what each request does to them."""

    def __init__(self, preloaded: dict[str, Any]) -> None:
        self.preloaded = preloaded
        self.contexts = {DEFAULT_CONTEXT: Context(DEFAULT_CONTEXT, os.getcwd(), preloaded)}

    def context(self, request: dict[str, Any]) -> Context:
        context_id = request.get("context") or DEFAULT_CONTEXT
        context = self.contexts.get(str(context_id))
        if context is None:
            raise Fault("not_found", f"no context {context_id!r}")
        return context

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op is None:
            env = request.get("env") or {}
            if not isinstance(env, dict):
                raise Fault("invalid_argument", "env must be an object")
            env = {str(k): str(v) for k, v in env.items()}
            return _run(str(request.get("code", "")), self.context(request), env)
        if op == "list_contexts":
            return {"contexts": [c.describe() for c in self.contexts.values()]}
        if op == "create_context":
            if len(self.contexts) >= MAX_CONTEXTS:
                raise Fault("invalid_argument", f"at most {MAX_CONTEXTS} contexts; delete one first")
            cwd = str(request.get("cwd") or self.contexts[DEFAULT_CONTEXT].cwd)
            if not os.path.isdir(cwd):
                raise Fault("invalid_argument", f"{cwd} is not a directory")
            context = Context(secrets.token_hex(8), cwd, self.preloaded)
            self.contexts[context.id] = context
            return {"context": context.describe()}
        if op == "restart_context":
            context = self.context(request)
            context.restart()
            return {"context": context.describe()}
        if op == "delete_context":
            context = self.context(request)
            if context.id == DEFAULT_CONTEXT:
                raise Fault("invalid_argument", "the default context cannot be deleted")
            del self.contexts[context.id]
            return {}
        raise Fault("invalid_argument", f"unknown op {op!r}")


def main() -> None:
    signal.signal(signal.SIGINT, _interrupt)
    channel = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    preload = [m for m in os.environ.get("TARTARUS_PRELOAD", "").split(",") if m]
    preloaded: dict[str, Any] = {}
    for module in preload:
        preloaded[module.split(".")[0]] = importlib.import_module(module)
    for module, alias in (("pandas", "pd"), ("numpy", "np"), ("matplotlib.pyplot", "plt")):
        if module in preload:
            preloaded[alias] = sys.modules[module]
    _patch_pyplot()
    interpreter = Interpreter(preloaded)
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
            _reseed()
            if "code" not in request and "op" not in request:
                _send(channel, {"id": rid})
                continue
        try:
            _send(channel, {"id": rid, **interpreter.handle(request)})
        except Fault as e:
            _send(channel, {"id": rid, "fault": {"code": e.code, "message": str(e)}})


if __name__ == "__main__":
    main()
