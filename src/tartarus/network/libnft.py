"""nftables through libnftables, in process, inside a sandbox's namespace.

`nft -f` as a subprocess costs 10-25 ms on a busy host (fork of a large daemon, exec, library start);
an addition through a libnftables context that already exists takes 0.05-0.2 ms, which is what keeps
a policy swap (a create asking for network, a quarantine) inside its budget.

A context's netlink socket belongs to the namespace it was opened in, so each sandbox gets one
`NftContext`, opened once (off the create's clock) on a short-lived thread that enters the namespace
first — namespaces are per thread on Linux, so no other code ever runs in a namespace it did not ask
for — and used from any thread afterwards. The socket keeps the namespace alive: close the context
before deleting the namespace.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TypeVar

from tartarus.errors import SandboxFailed, SetupRequired

CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


@cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("nftables") or "libnftables.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise SetupRequired(f"libnftables is not installed ({e}): run ./scripts/setup") from e
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    return lib


def _new_ctx() -> int:
    """A libnftables context whose netlink socket is in the calling thread's namespace."""
    lib = _lib()
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise SandboxFailed("libnftables: cannot create a context")
    lib.nft_ctx_buffer_output(ctx)
    lib.nft_ctx_buffer_error(ctx)
    return int(ctx)


def _run(ctx: int, commands: str) -> str:
    lib = _lib()
    rc = lib.nft_run_cmd_from_buffer(ctx, commands.encode())
    out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
    if rc != 0:
        err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace").strip()
        raise SandboxFailed(f"nft failed: {err or rc}")
    return out


def _nft(commands: str) -> str:
    """Run an nft script in the calling thread's namespace with a context of its own."""
    ctx = _new_ctx()
    try:
        return _run(ctx, commands)
    finally:
        _lib().nft_ctx_free(ctx)


class NftContext:
    """A libnftables context bound to one namespace; calls are serialised (contexts are not
    thread-safe). `run` blocks for as long as the kernel commits: call it inline only for additions
    (sub-millisecond), and through `arun` (a worker thread) for anything that deletes."""

    def __init__(self, netns: Path) -> None:
        self._ctx: int | None = in_netns(netns, _new_ctx).result()
        self._lock = threading.Lock()

    def run(self, commands: str) -> str:
        with self._lock:
            if self._ctx is None:
                raise SandboxFailed("nft context is closed")
            return _run(self._ctx, commands)

    async def arun(self, commands: str) -> str:
        return await asyncio.to_thread(self.run, commands)

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                _lib().nft_ctx_free(self._ctx)
                self._ctx = None


def in_netns(netns: Path | None, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
    """Run `fn` on a new thread that first enters `netns` (None: stay in ours)."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def target() -> None:
        try:
            if netns is not None:
                fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise SandboxFailed(f"cannot enter {netns}: {os.strerror(err)}")
                finally:
                    os.close(fd)
            future.set_result(fn())
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=target, name="netns-op", daemon=True).start()
    return future


def nft(commands: str, netns: Path | None = None) -> str:
    """One-off: a fresh context in `netns` (None: ours) for a single script."""
    return in_netns(netns, lambda: _nft(commands)).result()


def write_sysctl(netns: Path | None, name: str, value: str) -> None:
    """Write a net.* sysctl of `netns` (/proc/sys/net is resolved by the opening thread's namespace)."""
    path = Path("/proc/sys") / name.replace(".", "/")
    in_netns(netns, lambda: path.write_text(value + "\n")).result()
