"""`tartarus agent` and `tartarus gateway` as real subprocesses, and the network a test cluster runs on.

`ClusterNet` is a private /24 on a bridge the tests create (scripts/cluster-net, shared with
scripts/local-cluster): the host's end holds `.1`, where the suite's cluster PostgreSQL and S3 store
listen, and each agent gets a network namespace of its own on it (`node`), with its own address. An agent
`Role` given such a namespace runs in it (its sandboxes' namespaces, uplinks and nft tables are made from
there) and serves, and exposes guest ports, on its address; gateways run on loopback and reach agents,
the database and the store over the bridge. Nothing is added to the host's real interfaces. A node can
be cut off with nftables in its namespace (`partition`) and joined again (`heal`).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx

from tartarus.paths import REPO_ROOT
from tests.conftest import wait_until
from tests.leaks import TEST_NETNS_PREFIX
from tests.served import TARTARUS

NET_SCRIPT = REPO_ROOT / "scripts" / "cluster-net"
AGENT_PORT = 8701  # every agent has its own namespace, so the same port
PARTITION_TABLE = "tartarus_test_partition"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _net(*args: str) -> None:
    done = subprocess.run([str(NET_SCRIPT), *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"cluster-net {' '.join(args)} failed: {done.stderr.strip()}")


def _in_netns(netns: str, argv: list[str], stdin: str | None = None) -> str:
    done = subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {netns} failed: {done.stderr.strip()}")
    return done.stdout


def _unused_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.233.0.0/16 that no route on this host covers yet."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True)
    taken = [
        ipaddress.ip_network(word, strict=False)
        for line in routes.stdout.splitlines()
        for word in line.split()[:1]
        if word[0].isdigit()
    ]
    for _ in range(64):
        subnet = ipaddress.IPv4Network(f"10.233.{secrets.randbelow(256)}.0/24")
        if not any(subnet.overlaps(t) for t in taken):
            return subnet
    raise RuntimeError("no free /24 in 10.233.0.0/16 for the test cluster's network")


@dataclass(frozen=True)
class Node:
    """An agent's network namespace on the cluster bridge."""

    netns: str
    link: str  # the veth's host end, on the bridge
    address: str

    def partition(self) -> None:
        """Drop everything in and out of the namespace's link (its loopback and sandboxes untouched)."""
        _in_netns(
            self.netns,
            ["nft", "-f", "-"],
            f"table inet {PARTITION_TABLE} {{\n"
            '  chain in { type filter hook input priority -300; policy accept; iifname "eth0" drop; }\n'
            '  chain out { type filter hook output priority -300; policy accept; oifname "eth0" drop; }\n'
            "}\n",
        )

    def heal(self) -> None:
        _in_netns(self.netns, ["nft", "delete", "table", "inet", PARTITION_TABLE])


class ClusterNet:
    """The bridge (host end `.1`) and the nodes' namespaces made on it; `close` removes them all."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.subnet = _unused_subnet()
        hosts = self.subnet.hosts()
        self.host = str(next(hosts))
        self._free = [str(a) for a in hosts][8:]  # nodes from .10 on
        self.bridge = f"ttb{self.tag}"
        self.nodes: list[Node] = []
        self._made = 0
        _net("bridge-up", self.bridge, f"{self.host}/{self.subnet.prefixlen}")

    def node(self, name: str) -> Node:
        node = Node(f"{TEST_NETNS_PREFIX}{self.tag}-{name}", f"ttv{self.tag}{self._made}", self._free.pop(0))
        self._made += 1
        self.nodes.append(node)  # first, so that `remove` undoes a half-made one
        _net("node-up", self.bridge, node.netns, node.link, f"{node.address}/{self.subnet.prefixlen}")
        return node

    def remove(self, node: Node) -> None:
        _net("node-down", node.netns, node.link)
        self.nodes.remove(node)
        if Path(f"/run/netns/{node.netns}").exists():
            raise RuntimeError(f"network namespace {node.netns} is still there")

    def close(self) -> None:
        for node in list(self.nodes):
            self.remove(node)
        _net("bridge-down", self.bridge)
        if Path(f"/sys/class/net/{self.bridge}").exists():
            raise RuntimeError(f"bridge {self.bridge} is still there")


class Role:
    """One `tartarus <role>` process; `url` is where it serves. An agent given a `node` runs in that
    namespace, on its address; otherwise it serves on a free loopback port."""

    def __init__(
        self,
        root: Path,
        role: str,
        name: str,
        database_url: str,
        token: str,
        *args: str,
        env: dict[str, str] | None = None,
        node: Node | None = None,
        wait: bool = True,
    ) -> None:
        self.node = node
        host, self.port = (node.address, AGENT_PORT) if node is not None else ("127.0.0.1", free_port())
        self.url = f"http://{host}:{self.port}"
        self.name = name
        self.state = root / name
        self.state.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "TARTARUS_STATE_DIR": str(self.state),
            "TARTARUS_POOL_SIZE": "0",
            "TARTARUS_DATABASE_URL": database_url,
            "TARTARUS_AGENT_TOKEN": token,
            **({"TARTARUS_EXPOSE_HOST": host} if node is not None else {}),
            **(env or {}),
        }
        extra = ["--name", name] if role == "agent" else []
        # nsenter (scripts/cluster-net says why) execs the agent: `proc` is the agent itself.
        enter = ["nsenter", f"--net=/run/netns/{node.netns}"] if node is not None else []
        self.log_path = root / f"{name}.log"
        self.log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [*enter, str(TARTARUS), role, "--host", host, "--port", str(self.port), *extra, *args],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_up()

    def wait_up(self) -> None:
        """Until it serves (`wait=False` starts several at once)."""
        assert wait_until(self._up, timeout=90), f"{self.name} did not come up: {self.log_path.read_text()}"

    def _up(self) -> bool:
        assert self.proc.poll() is None, f"{self.name} exited: {self.log_path.read_text()[-2000:]}"
        try:
            return httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=90)
        self.log.close()
        return code
