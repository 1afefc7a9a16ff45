"""A daemon for the SDK when none runs: `Sandbox.create` with no daemon to talk to starts one in this
process, as `tartarus run` does, so the README's first example works on a fresh machine.

Only for the default local socket (no URL given, no TARTARUS_URL): a daemon named explicitly that does
not answer is an error to see. The embedded daemon lives until the interpreter exits; its VMMs die
with this process (parent-death signal) even if that stop never runs.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from tartarus.paths import default_socket, state_dir

_lock = threading.Lock()
_embedded: Path | None = None  # this process's embedded daemon's socket, once started


def daemon_answers(sock: Path) -> bool:
    """A daemon serves the API on `sock` (a socket file can outlive its daemon)."""
    if not sock.exists():
        return False
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=2) as c:
            return c.get("http://tartarus/v1/health").status_code == 200
    except httpx.HTTPError:
        return False


def local_socket() -> Path:
    """The socket an SDK call with no URL talks to: this process's embedded daemon once it started
    (its sandboxes live there), else the local daemon's default socket."""
    return _embedded or default_socket()


def url_for_create(url: str | None) -> str | None:
    """The URL a `create` should use: `url` as given, None (resolved as usual) when TARTARUS_URL is set
    or a daemon answers locally, else this process's embedded daemon, started on first use."""
    if url or os.environ.get("TARTARUS_URL") or _embedded or daemon_answers(default_socket()):
        return url
    return f"unix://{_start_embedded()}"


def _at_exit(stop: Callable[[], object]) -> None:
    """Run `stop` as the interpreter exits, before its thread pools refuse work: the daemon's stop
    needs them (its store), and plain `atexit` runs after they shut down. CPython's hook for this is
    internal (concurrent.futures uses it); registered after theirs, it runs first (last in, first out)."""
    import concurrent.futures.thread  # noqa: F401  (registers its shutdown hook first)

    getattr(threading, "_register_atexit", atexit.register)(stop)


def _start_embedded() -> Path:
    global _embedded
    with _lock:
        if _embedded is None:
            # Server code, imported only here: a client of a running daemon never loads it.
            from tartarus.daemon.server import embedded_daemon

            stack = contextlib.ExitStack()
            _embedded = stack.enter_context(embedded_daemon(state_dir()))
            _at_exit(stack.close)
        return _embedded
