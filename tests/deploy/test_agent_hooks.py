"""The agent DaemonSet's start command and preStop hook, run as written in the rendered manifest, against
a real `tartarus agent` and PostgreSQL: the pod's network is a network namespace the test creates (the
agent listens on its fixed port there, as on a host), its environment is the manifest's with the
Secrets, ConfigMap and downward API filled in and the hostPaths mapped to temporary directories.

Stopping the pod drains the node and the next start takes work again; a drain an operator asked for
survives the restart."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartarus.cluster.db import connect
from tartarus.cluster.membership import Membership
from tartarus.cluster.model import Admin
from tartarus.cluster.schema import migrate
from tartarus.paths import REPO_ROOT, cache_dir
from tests.cluster.helpers import until
from tests.deploy.kustomize import Obj, build
from tests.served import TARTARUS

NODE = "node-hook"


class Pod:
    """The agent container of the rendered DaemonSet, run in a network namespace."""

    def __init__(self, netns: str, env: dict[str, str], container: Obj, log: Path) -> None:
        self.netns = netns
        self.env = env
        self.container = container
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def in_pod(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", *argv]

    def start(self) -> None:
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                self.in_pod([*self.container["command"], *self.container["args"]]),
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def pre_stop(self) -> subprocess.CompletedProcess[str]:
        command = self.container["lifecycle"]["preStop"]["exec"]["command"]
        return subprocess.run(self.in_pod(command), env=self.env, capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        """What the kubelet does after the preStop hook: SIGTERM, and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=90)


def _pod_env(
    agent: Obj, config: dict[str, str], state: Path, database_url: str, token: str
) -> dict[str, str]:
    (main,) = agent["spec"]["template"]["spec"]["containers"]
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    host_dirs = {"state": str(state), "cache": str(cache_dir())}  # the hostPaths, here
    fields = {"spec.nodeName": NODE, "status.podIP": "127.0.0.1"}
    secret_values = {("tartarus-database", "url"): database_url, ("tartarus-agent-token", "token"): token}
    env = {
        "PATH": f"{TARTARUS.parent}:{os.environ['PATH']}",
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "TARTARUS_POOL_SIZE": "0",
    }
    for entry in main["env"]:
        name = entry["name"]
        if "value" in entry:
            value = entry["value"]
            env[name] = host_dirs[mounts[value]] if value in mounts else value
            continue
        source = entry["valueFrom"]
        if "fieldRef" in source:
            env[name] = fields[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[name] = secret_values[ref["name"], ref["key"]]
        else:
            env[name] = config[source["configMapKeyRef"]["key"]]
    return env


@pytest.fixture
def netns() -> Iterator[str]:
    name = "tt-k8s-" + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_stopping_the_pod_drains_the_node_and_the_next_start_takes_work_again(
    postgres_server_url: str, netns: str, tmp_path: Path
) -> None:
    from tests.pg import fresh_database

    objects = build(REPO_ROOT / "deploy" / "k8s" / "base")
    agent = next(o for o in objects if o["kind"] == "DaemonSet")
    config = next(o for o in objects if o["kind"] == "ConfigMap")["data"]
    url = fresh_database(postgres_server_url, "hooks_" + secrets.token_hex(4))
    with connect(url) as conn:
        migrate(conn)  # so the test can poll the nodes before the agent's own (idempotent) migration
    state = tmp_path / "state"
    env = _pod_env(agent, config, state, url, secrets.token_hex(32))
    (main,) = agent["spec"]["template"]["spec"]["containers"]
    pod = Pod(netns, env, main, tmp_path / "agent.log")

    def node_is(epoch: int, admin: Admin) -> bool:
        assert pod.proc is not None and pod.proc.poll() is None, pod.log.read_text()[-2000:]
        with connect(url) as conn:
            nodes = {n.name: n for n in Membership(conn).nodes()}
        node = nodes.get(NODE)
        return node is not None and node.healthy and node.epoch == epoch and node.admin == admin

    try:
        pod.start()
        assert until(lambda: node_is(1, Admin.ACTIVE), timeout=90), pod.log.read_text()[-2000:]
        drained = pod.pre_stop()
        assert drained.returncode == 0, drained.stderr
        assert f"{NODE} draining" in drained.stdout
        assert node_is(1, Admin.DRAINING)
        pod.stop()

        pod.start()  # the marker the hook left: this start uncordons the node, once
        assert until(lambda: node_is(2, Admin.ACTIVE), timeout=90), pod.log.read_text()[-2000:]
        assert list(state.glob("drained-on-stop")) == []

        # An operator's drain leaves no marker: the node stays out of placement across a restart.
        operator = subprocess.run(
            pod.in_pod(["tartarus", "nodes", "drain", NODE]),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert operator.returncode == 0, operator.stderr
        pod.stop()
        pod.start()
        assert until(lambda: node_is(3, Admin.DRAINING), timeout=90), pod.log.read_text()[-2000:]
    finally:
        pod.stop()
    assert env["TARTARUS_AGENT_TOKEN"] not in pod.log.read_text()
