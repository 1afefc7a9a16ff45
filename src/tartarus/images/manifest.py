"""OCI and Docker schema 2 documents: descriptors, manifests, indexes, image configs, platforms.

Parsing is strict about what matters for safety and correctness (digests, sizes, media types) and lenient
about the rest, so images from the many tools that write slightly different JSON still convert.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tartarus.images.errors import ImageError, ImageNotFound, UnsupportedMediaType
from tartarus.images.reference import parse_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

# Layer media type → the compression it declares ("" = plain tar).
LAYER_TYPES: dict[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}
MAX_DOCUMENT_BYTES = 4 * 2**20  # manifests and configs; the distribution spec's own limit


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None

    @classmethod
    def parse(cls, data: Any, what: str) -> Descriptor:
        if not isinstance(data, dict):
            raise ImageError(f"{what}: descriptor is not an object")
        size = data.get("size")
        if not isinstance(size, int) or size < 0:
            raise ImageError(f"{what}: descriptor has no valid size")
        digest = data.get("digest")
        if not isinstance(digest, str):
            raise ImageError(f"{what}: descriptor has no digest")
        platform = data.get("platform")
        return cls(
            media_type=str(data.get("mediaType", "")),
            digest=parse_digest(digest),
            size=size,
            platform=Platform.parse(platform) if isinstance(platform, dict) else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Platform:
        return cls(str(data.get("os", "")), str(data.get("architecture", "")), str(data.get("variant", "")))

    @classmethod
    def from_string(cls, text: str) -> Platform:
        """`linux/amd64`, `linux/arm64/v8`."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ImageError(f"invalid platform {text!r} (expected os/arch[/variant])")
        return cls(*parts)

    def matches(self, other: Platform) -> bool:
        """Does an index entry (`other`) serve this wanted platform? An empty wanted variant takes any."""
        return (
            self.os == other.os
            and self.architecture == other.architecture
            and (not self.variant or self.variant == other.variant)
        )

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


DEFAULT_PLATFORM = Platform("linux", "amd64")


@dataclass(frozen=True)
class ImageConfig:
    """What the image says about how to run it."""

    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    workdir: str = "/"
    user: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "env": self.env,
            "entrypoint": self.entrypoint,
            "cmd": self.cmd,
            "workdir": self.workdir,
            "user": self.user,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageConfig:
        return cls(
            env=dict(data["env"]),
            entrypoint=list(data["entrypoint"]),
            cmd=list(data["cmd"]),
            workdir=str(data["workdir"]),
            user=str(data["user"]),
        )


@dataclass(frozen=True)
class ConfigBlob:
    config: ImageConfig
    diff_ids: list[str]
    platform: Platform


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: list[Descriptor]
    media_type: str


def load_json(raw: bytes, what: str) -> Any:
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise ImageError(f"{what} is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{what} is not valid JSON: {e}") from e


def document_type(data: Any, declared: str, what: str) -> str:
    """The media type of a manifest or index: the HTTP/descriptor type, else the document's own field."""
    if not isinstance(data, dict):
        raise ImageError(f"{what} is not a JSON object")
    media_type = declared.split(";")[0].strip() if declared else ""
    if media_type in ("", "application/json", "application/octet-stream"):
        media_type = str(data.get("mediaType", ""))
        if not media_type and "manifests" in data:
            media_type = OCI_INDEX
        elif not media_type and "layers" in data:
            media_type = OCI_MANIFEST
    if media_type in DOCKER_SCHEMA1 or data.get("schemaVersion") == 1:
        raise UnsupportedMediaType(f"{what}: Docker schema 1 manifests are not supported (re-push the image)")
    if media_type not in MANIFEST_TYPES + INDEX_TYPES:
        raise UnsupportedMediaType(f"{what}: unsupported manifest media type {media_type!r}")
    return media_type


def parse_manifest(data: dict[str, Any], media_type: str, what: str) -> Manifest:
    layers = data.get("layers")
    if not isinstance(layers, list):
        raise ImageError(f"{what}: manifest has no layers list")
    config = Descriptor.parse(data.get("config"), f"{what} config")
    parsed = [Descriptor.parse(layer, f"{what} layer {i}") for i, layer in enumerate(layers)]
    for i, layer in enumerate(parsed):
        if layer.media_type not in LAYER_TYPES:
            raise UnsupportedMediaType(f"{what}: layer {i} has unsupported media type {layer.media_type!r}")
    return Manifest(config=config, layers=parsed, media_type=media_type)


def select_platform(data: dict[str, Any], want: Platform, what: str) -> Descriptor:
    """The index entry for `want`; the error lists what the index offers."""
    entries = data.get("manifests")
    if not isinstance(entries, list):
        raise ImageError(f"{what}: index has no manifests list")
    offered: list[str] = []
    for i, entry in enumerate(entries):
        desc = Descriptor.parse(entry, f"{what} entry {i}")
        if desc.platform is None:
            continue
        offered.append(str(desc.platform))
        if want.matches(desc.platform):
            return desc
    raise ImageNotFound(
        f"{what} has no image for platform {want} (it offers: {', '.join(offered) or 'nothing'})"
    )


def _string_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageError(f"image config: {what} is not a list of strings")
    return list(value)


def parse_config(raw: bytes, what: str) -> ConfigBlob:
    data = load_json(raw, what)
    if not isinstance(data, dict):
        raise ImageError(f"{what} is not a JSON object")
    run = data.get("config") or {}
    if not isinstance(run, dict):
        raise ImageError(f"{what}: config is not an object")
    env: dict[str, str] = {}
    for item in _string_list(run.get("Env"), "Env"):
        key, _, value = item.partition("=")
        if key:
            env[key] = value
    rootfs = data.get("rootfs") or {}
    diff_ids = [parse_digest(d) for d in _string_list(rootfs.get("diff_ids"), "rootfs.diff_ids")]
    return ConfigBlob(
        config=ImageConfig(
            env=env,
            entrypoint=_string_list(run.get("Entrypoint"), "Entrypoint"),
            cmd=_string_list(run.get("Cmd"), "Cmd"),
            workdir=str(run.get("WorkingDir") or "/"),
            user=str(run.get("User") or ""),
        ),
        diff_ids=diff_ids,
        platform=Platform(
            str(data.get("os", "")), str(data.get("architecture", "")), str(data.get("variant", ""))
        ),
    )
