"""deploy/k8s renders (with the loader CI has, checked against kubectl where it is installed), every object
validates strictly against the Kubernetes schemas (a misspelled field fails), and the invariants the
cluster relies on hold: a privileged agent per host with KVM, TUN, state on the host, a drain before it
stops and readiness on /v1/health?ready=true; at least two gateways kept by a disruption budget; secrets
only by reference; images pinned."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tartarus.paths import REPO_ROOT
from tests.deploy.kustomize import Obj, Unsupported, apply_operation, build, containers, split_image

K8S = REPO_ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = [K8S / "base", K8S / "examples" / "cnpg"]
# The oldest and newest Kubernetes minors the bundled schemas cover that we promise to validate against.
VERSIONS = ("1.29.0", "1.37.0")
# Kinds of operators' CRDs: no schema in kubernetes-validate; checked by the tests that use them.
CUSTOM = {("postgresql.cnpg.io/v1", "Cluster")}
SECRETS = {"tartarus-database": "url", "tartarus-agent-token": "token"}
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|DATABASE_URL|API_KEY", re.I)


def _render(directory: Path) -> list[Obj]:
    return build(directory)


def _one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _pod(obj: Obj) -> Obj:
    pod: Obj = obj["spec"]["template"]["spec"]
    return pod


def _env(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def _kubectl_render(directory: Path) -> list[Obj]:
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _keyed(objects: list[Obj]) -> dict[tuple[str, str, str], Obj]:
    return {(o["apiVersion"], o["kind"], o["metadata"]["name"]): o for o in objects}


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (CI has no kubectl)")
def test_the_loader_renders_what_kubectl_kustomize_renders(directory: Path) -> None:
    ours, theirs = _keyed(_render(directory)), _keyed(_kubectl_render(directory))
    assert ours == theirs


def test_the_loader_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(Unsupported, match="namePrefix"):
        build(tmp_path)
    obj: Obj = {"spec": {"env": [{"name": "A"}]}}
    with pytest.raises(ValueError, match="test failed"):
        apply_operation(obj, {"op": "test", "path": "/spec/env/0/name", "value": "B"})


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_strictly(directory: Path, version: str) -> None:
    objects = _render(directory)
    assert len(objects) >= 6
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM:
            continue
        kubernetes_validate.validate(obj, version, strict=True)


def test_a_misspelled_field_fails_validation() -> None:
    agent = _one(_render(K8S / "base"), "DaemonSet", "tartarus-agent")
    kubernetes_validate.validate(agent, VERSIONS[-1], strict=True)
    typos: list[tuple[list[str | int], str, str]] = [
        (["spec", "template", "spec"], "hostNetwork", "hostNetwrok"),
        (["spec", "template", "spec", "containers", 0, "readinessProbe", "httpGet"], "path", "paht"),
        (["spec", "template", "spec", "containers", 0, "securityContext"], "privileged", "priviledged"),
    ]
    for where, right, wrong in typos:
        broken = copy.deepcopy(agent)
        node: Any = broken
        for step in where:
            node = node[step]
        node[wrong] = node.pop(right)
        with pytest.raises(kubernetes_validate.ValidationError, match=wrong):
            kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_the_agent_runs_privileged_per_host_with_kvm_tun_and_host_state() -> None:
    objects = _render(K8S / "base")
    agent = _one(objects, "DaemonSet", "tartarus-agent")
    pod = _pod(agent)
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["automountServiceAccountToken"] is False  # it never talks to the Kubernetes API
    (main,) = pod["containers"]
    assert main["securityContext"]["privileged"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    for device in ("/dev/kvm", "/dev/net/tun"):
        source = volumes[mounts[device]]["hostPath"]
        assert source == {"path": device, "type": "CharDevice"}
    env = _env(main)
    for variable in ("TARTARUS_STATE_DIR", "TARTARUS_CACHE_DIR"):
        state = volumes[mounts[env[variable]["value"]]]
        assert state["hostPath"]["path"].startswith("/var/lib/tartarus/"), state
        assert state["hostPath"]["type"] == "DirectoryOrCreate"
    # It is named after its node and listens on the node's address, on the port its probes use.
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    script = main["args"][0]
    assert re.search(r'exec tartarus agent --host "\$POD_IP" --port 8701 --name "\$NODE_NAME"', script)
    assert main["ports"] == [{"name": "http", "containerPort": 8701, "protocol": "TCP"}]
    ready = main["readinessProbe"]["httpGet"]
    assert (ready["path"], ready["port"]) == ("/v1/health?ready=true", 8701)
    assert main["livenessProbe"]["httpGet"]["path"] == "/v1/health"
    # The setup init container builds the caches on the host's disk, with KVM.
    (setup,) = pod["initContainers"]
    assert setup["command"] == ["tartarus", "setup"] and setup["image"] == main["image"]


def test_the_agent_drains_its_node_before_it_stops() -> None:
    agent = _one(_render(K8S / "base"), "DaemonSet", "tartarus-agent")
    pod = _pod(agent)
    (main,) = pod["containers"]
    command = main["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    assert re.search(r'exec tartarus nodes drain "\$NODE_NAME"$', command[2])
    # The drain can reach the database and the agent (same environment as the container).
    assert {"TARTARUS_DATABASE_URL", "TARTARUS_AGENT_TOKEN", "NODE_NAME"} <= set(_env(main))
    # Hibernating a full node takes minutes under load: the grace period must cover it.
    assert pod["terminationGracePeriodSeconds"] >= 300
    # Its marker is what the next start uncordons; both scripts are valid shell.
    marker = re.search(r'touch "(\$TARTARUS_STATE_DIR/[^"]+)"', command[2])
    assert marker is not None and f'[ -e "{marker[1]}" ]' in main["args"][0]
    for script in (command[2], main["args"][0]):
        subprocess.run(["sh", "-n", "-c", script], check=True)


def test_gateways_are_replicated_behind_a_service_and_a_disruption_budget() -> None:
    objects = _render(K8S / "base")
    gateway = _one(objects, "Deployment", "tartarus-gateway")
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    replicas = gateway["spec"]["replicas"]
    assert replicas >= 2
    assert gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = _one(objects, "PodDisruptionBudget", "tartarus-gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= pdb["spec"]["minAvailable"] < replicas  # keeps one serving, still lets a node drain
    service = _one(objects, "Service", "tartarus-gateway")
    assert service["spec"]["selector"].items() <= labels.items()
    (main,) = _pod(gateway)["containers"]
    assert {p["name"] for p in main["ports"]} >= {p["targetPort"] for p in service["spec"]["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert main[probe]["httpGet"] == {"path": "/v1/health", "port": "http"}
    # The gateway needs no privilege at all.
    assert _pod(gateway)["securityContext"]["runAsNonRoot"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # The agent selector does not catch gateway pods, nor the reverse.
    agent_labels = _pod_labels(_one(objects, "DaemonSet", "tartarus-agent"))
    assert not pdb["spec"]["selector"]["matchLabels"].items() <= agent_labels.items()


def _pod_labels(obj: Obj) -> dict[str, str]:
    labels: dict[str, str] = obj["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_no_secret_value_is_in_a_manifest(directory: Path) -> None:
    objects = _render(directory)
    assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are created out of band"
    config = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    referenced = set()
    for obj in objects:
        for container in containers(obj):
            for env in container.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "value" not in env, f"{env['name']} is inline in {obj['metadata']['name']}"
                    referenced.add((env["name"], tuple(sorted(env["valueFrom"]["secretKeyRef"].items()))))
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref is not None:  # every ConfigMap key a container reads exists
                    assert ref["key"] in config[ref["name"]], ref
    names = {name for name, _ in referenced}
    assert names == {"TARTARUS_DATABASE_URL", "TARTARUS_AGENT_TOKEN"}
    if directory.name == "base":
        assert {dict(ref)["name"]: dict(ref)["key"] for _, ref in referenced} == SECRETS
    # Nor anything that looks like a credential anywhere in the files.
    for path in directory.rglob("*.yaml"):
        text = path.read_text()
        assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), f"a URL with a password in {path}"
        assert not re.search(r"\b[0-9a-f]{32,}\b", text), f"a token-like string in {path}"


def test_the_cnpg_example_points_both_roles_at_the_operators_secret() -> None:
    objects = _render(K8S / "examples" / "cnpg")
    cluster = _one(objects, "Cluster", "tartarus-db")
    assert cluster["spec"]["instances"] >= 3 and cluster["spec"]["bootstrap"]["initdb"]["database"]
    for kind, name in (("DaemonSet", "tartarus-agent"), ("Deployment", "tartarus-gateway")):
        (main,) = _pod(_one(objects, kind, name))["containers"]
        ref = _env(main)["TARTARUS_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        # CloudNativePG's application secret is <cluster>-app, its URL under `uri`.
        assert ref == {"name": f"{cluster['metadata']['name']}-app", "key": "uri"}


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_images_are_pinned(directory: Path) -> None:
    objects = _render(directory)
    images = [c["image"] for o in objects for c in containers(o)]
    images += [o["spec"]["imageName"] for o in objects if o["kind"] == "Cluster"]
    assert len(images) >= 3
    for image in images:
        _, tag = split_image(image)
        assert tag and tag != "latest", f"{image} is not pinned to a version"
    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    for base in re.findall(r"^FROM (\S+)", dockerfile, re.M):
        if base in re.findall(r" AS (\S+)", dockerfile):
            continue  # an earlier stage
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", base), base


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_everything_is_in_the_tartarus_namespace(directory: Path) -> None:
    for obj in _render(directory):
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == "tartarus"
        else:
            assert obj["metadata"]["namespace"] == "tartarus", obj["metadata"]["name"]
