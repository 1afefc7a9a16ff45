"""nftables through libnftables, in process, inside a sandbox's namespace.

`nft -f` as a subprocess costs 10-25 ms on a busy host (fork of a large daemon, exec, library start);
the same transaction through libnftables takes well under a millisecond, which is what keeps a policy
swap (a create asking for network, a quarantine) inside its budget. Namespaces are per thread on
Linux, so each call runs on a short-lived thread of its own that enters the namespace first: no
other code ever runs in a namespace it did not ask for.
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


def _nft(commands: str) -> str:
    """Run an nft script in the calling thread's namespace; return its output."""
    lib = _lib()
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise SandboxFailed("libnftables: cannot create a context")
    try:
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        rc = lib.nft_run_cmd_from_buffer(ctx, commands.encode())
        out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        if rc != 0:
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace").strip()
            raise SandboxFailed(f"nft failed: {err or rc}")
        return out
    finally:
        lib.nft_ctx_free(ctx)


def _in_netns(netns: Path | None, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
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
    return _in_netns(netns, lambda: _nft(commands)).result()


async def anft(commands: str, netns: Path | None = None) -> str:
    return await asyncio.wrap_future(_in_netns(netns, lambda: _nft(commands)))


def write_sysctl(netns: Path | None, name: str, value: str) -> None:
    """Write a net.* sysctl of `netns` (/proc/sys/net is resolved by the opening thread's namespace)."""
    path = Path("/proc/sys") / name.replace(".", "/")
    _in_netns(netns, lambda: path.write_text(value + "\n")).result()
