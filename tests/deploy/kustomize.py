"""Render a kustomization the way `kubectl kustomize` does, for the part of kustomize deploy/k8s uses:
`resources` (files, and directories holding a kustomization), `patches` (JSON 6902, on one target named
by kind and name) and `images` (new name and tag). CI has no kubectl, so this is what the manifest tests
render with; a field outside that subset is refused rather than silently ignored, and where kubectl is
installed a test checks both render the same objects."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = frozenset({"apiVersion", "kind", "resources", "patches", "images"})
Obj = dict[str, Any]


class Unsupported(Exception):
    """The kustomization uses a feature this loader does not implement."""


def build(directory: Path) -> list[Obj]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise Unsupported(f"{directory}: kustomization fields {sorted(unknown)} are not implemented here")
    objects: list[Obj] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects += build(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in spec.get("patches", []):
        _patch(directory, objects, patch)
    for image in spec.get("images", []):
        _image(objects, image)
    return objects


def _patch(directory: Path, objects: list[Obj], patch: Obj) -> None:
    if set(patch) - {"target", "patch", "path"} or set(patch["target"]) - {"kind", "name"}:
        raise Unsupported(f"patch {patch}: only a target kind/name and a JSON 6902 patch are implemented")
    target = patch["target"]
    matches = [
        o
        for o in objects
        if o["kind"] == target["kind"] and ("name" not in target or o["metadata"]["name"] == target["name"])
    ]
    if len(matches) != 1:
        raise ValueError(f"patch target {target} matches {len(matches)} objects")
    text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
    operations = yaml.safe_load(text)
    if not isinstance(operations, list):
        raise Unsupported(f"patch {target}: only JSON 6902 patches (a list of operations) are implemented")
    for operation in operations:
        apply_operation(matches[0], operation)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _step(node: Any, part: str) -> Any:
    return node[int(part)] if isinstance(node, list) else node[part]


def apply_operation(obj: Obj, operation: Obj) -> None:
    """One RFC 6902 operation (add, replace, remove, test) in place; a failed `test` raises."""
    op, parts = operation["op"], _pointer(operation["path"])
    parent: Any = obj
    for part in parts[:-1]:
        parent = _step(parent, part)
    last = parts[-1]
    if op == "test":
        if _step(parent, last) != operation["value"]:
            raise ValueError(f"test failed: {operation['path']} is {_step(parent, last)!r}")
    elif op == "replace":
        _step(parent, last)  # must exist
        parent[int(last) if isinstance(parent, list) else last] = copy.deepcopy(operation["value"])
    elif op == "add":
        value = copy.deepcopy(operation["value"])
        if isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else int(last), value)
        else:
            parent[last] = value
    elif op == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    else:
        raise Unsupported(f"JSON patch operation {op!r}")


def containers(obj: Obj) -> list[Obj]:
    """The init and app containers of a workload's pod template (none for other kinds)."""
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def split_image(image: str) -> tuple[str, str]:
    """`registry:5000/a/b:tag` -> (`registry:5000/a/b`, `tag`); the tag is "" when there is none, and
    `@sha256:...` when the image is pinned by digest."""
    if "@" in image:
        name, _, digest = image.partition("@")
        return name, "@" + digest
    if ":" in image.rsplit("/", 1)[-1]:
        name, _, tag = image.rpartition(":")
        return name, tag
    return image, ""


def _image(objects: list[Obj], image: Obj) -> None:
    if set(image) - {"name", "newName", "newTag"}:
        raise Unsupported(f"image override {image}: only newName and newTag are implemented")
    for obj in objects:
        for container in containers(obj):
            name, tag = split_image(container["image"])
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
