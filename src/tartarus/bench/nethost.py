"""A destination for network benchmarks: a namespace the benchmark creates, with a TCP sink that
records when every chunk arrived — the kernel's receive timestamp (SO_TIMESTAMPNS, wall clock), not
when a Python thread got round to reading it, so a busy interpreter does not inflate the figures."""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tartarus.network.libnft import in_netns

ADDR = "203.0.113.2"  # TEST-NET-3: no policy denies it, nothing on a real network uses it
ROOT_ADDR = "203.0.113.1"
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


@dataclass
class Sink:
    """Accepts connections on `port` and records when data arrives."""

    sock: socket.socket
    port: int
    received: list[float] = field(default_factory=list)

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        with conn:
            while True:
                try:
                    data, ancillary, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16))
                except OSError:
                    return
                if not data:
                    return
                stamp = time.time()
                for level, kind, payload in ancillary:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= 16:
                        seconds, nanos = struct.unpack("qq", payload[:16])
                        stamp = seconds + nanos / 1e9
                self.received.append(stamp)

    def last(self) -> float:
        """Wall-clock arrival of the newest chunk (compare with time.time())."""
        return self.received[-1] if self.received else 0.0


def _listen(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    return s


@contextlib.contextmanager
def test_host(port: int = 18080) -> Iterator[Sink]:
    """Namespace at 203.0.113.2 behind a veth from the root namespace; removed on exit."""
    tag = secrets.token_hex(3)
    netns, link = f"tt-bench-{tag}", f"ttb{tag}"

    def ip(*argv: str) -> None:
        subprocess.run(["ip", *argv], check=True, capture_output=True)

    ip("netns", "add", netns)
    try:
        ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip("addr", "add", f"{ROOT_ADDR}/24", "dev", link)
        ip("link", "set", link, "up")
        ip("-n", netns, "addr", "add", f"{ADDR}/24", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        ip("-n", netns, "route", "add", "default", "via", ROOT_ADDR)
        sock = in_netns(Path("/run/netns") / netns, lambda: _listen(port)).result()
        sink = Sink(sock, port)
        threading.Thread(target=sink.serve, daemon=True).start()
        try:
            yield sink
        finally:
            sock.close()
    finally:
        subprocess.run(["ip", "link", "del", link], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
