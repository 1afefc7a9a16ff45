"""Real traffic between sandboxes and network namespaces these tests create (never beyond the host).

The test host sits in its own namespace at 203.0.113.2 (TEST-NET-3, which no policy denies), reached
through the root namespace like any other destination, with a listener that logs every connection
and every chunk of data with a timestamp.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tartarus.daemon.config import DaemonConfig
from tartarus.daemon.server import daemon_thread
from tartarus.sdk import Sandbox

pytestmark = pytest.mark.vm

HOST_ADDR = "203.0.113.2"
ROOT_ADDR = "203.0.113.1"

LISTENER = r"""
import selectors, socket, sys, time
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, ("listen", port))
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        kind, port = key.data
        if kind == "listen":
            c, addr = key.fileobj.accept()
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ, ("conn", port))
            print(f"conn {port} {addr[0]} {time.time()}", flush=True)
            continue
        try:
            data = key.fileobj.recv(65536)
        except OSError:
            data = b""
        if data:
            print(f"data {port} {len(data)} {time.time()}", flush=True)
        else:
            sel.unregister(key.fileobj)
            key.fileobj.close()
            print(f"close {port} {time.time()}", flush=True)
"""


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@dataclass
class Listener:
    """A TCP listener process (optionally inside a namespace) and what it has seen."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, ports: list[int], netns: str | None = None) -> Listener:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        argv = [*prefix, "python3", "-u", "-c", LISTENER, *map(str, ports)]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            process.kill()
            raise RuntimeError("listener did not start")
        listener = cls(process)
        threading.Thread(target=listener._read, daemon=True).start()
        return listener

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.strip())

    def connections(self, port: int) -> int:
        return sum(1 for ln in list(self.lines) if ln.startswith(f"conn {port} "))

    def data_times(self, port: int) -> list[float]:
        return [float(ln.split()[3]) for ln in list(self.lines) if ln.startswith(f"data {port} ")]

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@dataclass
class NetHost:
    netns: str
    link: str
    listener: Listener
    ports: list[int]


@pytest.fixture(scope="package")
def net_host() -> Iterator[NetHost]:
    with listening_host() as host:
        yield host


@contextlib.contextmanager
def listening_host() -> Iterator[NetHost]:
    """A namespace at 203.0.113.2 behind a veth from the root namespace, listening on two ports."""
    tag = secrets.token_hex(3)
    netns, link = f"tt-testhost-{tag}", f"tth{tag}"
    sh("ip", "netns", "add", netns)
    try:
        sh("ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns)
        sh("ip", "addr", "add", f"{ROOT_ADDR}/24", "dev", link)
        sh("ip", "link", "set", link, "up")
        sh("ip", "-n", netns, "addr", "add", f"{HOST_ADDR}/24", "dev", "eth0")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("ip", "-n", netns, "route", "add", "default", "via", ROOT_ADDR)
        ports = [18080, 18081]
        listener = Listener.start(ports, netns)
        try:
            yield NetHost(netns, link, listener, ports)
        finally:
            listener.stop()
    finally:
        subprocess.run(["ip", "link", "del", link], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


@pytest.fixture(scope="package")
def net_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A daemon of its own (pool of 1) so these tests see its state dir and audit log."""
    state = tmp_path_factory.mktemp("net-state")
    uds = state / "api.sock"
    with daemon_thread(state, uds, DaemonConfig(pool_size=1)):
        yield f"unix://{uds}", state


PROBE = r"""
import socket, concurrent.futures as cf
def _probe(target):
    host, port = target
    try:
        socket.create_connection((host, port), timeout={timeout}).close()
        return "open"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return type(e).__name__
with cf.ThreadPoolExecutor(16) as _pool:
    _r = dict(zip(map(str, {targets!r}), _pool.map(_probe, {targets!r})))
_r
"""


def probe(sb: Sandbox, targets: list[tuple[str, int]], timeout: float = 1.5) -> dict[tuple[str, int], str]:
    """Try a TCP connection from inside the guest to each target, in parallel: open / refused / error."""
    result = sb.run_code(PROBE.format(targets=targets, timeout=timeout), timeout=60)
    assert result.error is None, result.error
    assert result.result is not None
    raw = eval(result.result)  # a dict of str(tuple) -> str produced by our own snippet
    return {t: raw[str(t)] for t in targets}


def refused_packets(sandbox_id: str) -> int:
    """The sandbox namespace's nft counter of packets dropped from the guest."""
    out = sh(
        "ip",
        "netns",
        "exec",
        f"tartarus-{sandbox_id}",
        "nft",
        "-j",
        "list",
        "counter",
        "inet",
        "tartarus",
        "refused",
    )
    for item in json.loads(out)["nftables"]:
        if "counter" in item:
            return int(item["counter"]["packets"])
    raise AssertionError("no refused counter")


def leftovers(sandbox_id: str) -> list[str]:
    """Every host-side trace of a sandbox's network and cgroups that still exists."""
    found = []
    if f"tartarus-{sandbox_id}" in sh("ip", "netns", "list"):
        found.append("netns")
    if sandbox_id in sh("nft", "list", "ruleset"):
        found.append("nft")
    for root in Path("/sys/fs/cgroup").glob(f"*/tartarus/{sandbox_id}"):
        found.append(str(root))
    if (Path("/sys/fs/cgroup/tartarus") / sandbox_id).exists():
        found.append("cgroup v2")
    return found


def uplinks() -> set[str]:
    return {
        ln.split()[0].split("@")[0] for ln in sh("ip", "-br", "link").splitlines() if ln.startswith("trt")
    }


def wait_for(condition: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
