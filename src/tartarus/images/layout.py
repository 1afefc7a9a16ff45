"""Writing OCI image layouts (https://github.com/opencontainers/image-spec/blob/main/image-layout.md):
blobs, image configs, manifests and the index that tags them.

Used for the images Tartarus builds on the host (`tartarus.images.local`) and for test images, so both go
through the same conversion path as an image from a registry.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tartarus.images.manifest import DOCKER_CONFIG, DOCKER_MANIFEST, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST

REF_ANNOTATION = "org.opencontainers.image.ref.name"
LAYER_TYPES = {
    ("oci", ""): "application/vnd.oci.image.layer.v1.tar",
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("docker", ""): "application/vnd.docker.image.rootfs.diff.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ("docker", "zstd"): "application/vnd.docker.image.rootfs.diff.tar.zstd",
}


@dataclass(frozen=True)
class Blob:
    media_type: str
    digest: str
    size: int
    diff_id: str = ""

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def compress(raw: Path, out: Path, compression: str) -> None:
    """gzip (level 6, docker's default) or zstd (level 3) with the command-line tools, for speed."""
    cmd = {"gzip": ["gzip", "-6", "-n", "-c"], "zstd": ["zstd", "-q", "-3", "-c"], "": ["cat"]}[compression]
    with open(raw, "rb") as src, open(out, "wb") as dst:
        subprocess.run(cmd, stdin=src, stdout=dst, check=True)


class LayoutWriter:
    """An OCI image layout directory, written blob by blob."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        if not (root / "index.json").exists():
            self._write_index([])

    def _write_index(self, manifests: list[dict[str, Any]]) -> None:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        (self.root / "index.json").write_text(json.dumps(index, indent=1))

    def blob(self, data: bytes, media_type: str) -> Blob:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return Blob(media_type, digest, len(data))

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.partition(":")[2]

    def layer(self, tar: bytes | Path, compression: str = "gzip", flavour: str = "oci") -> Blob:
        """A layer blob from an uncompressed tar (bytes or a file), compressed as asked."""
        media_type = LAYER_TYPES[(flavour, compression)]
        if isinstance(tar, bytes):
            diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
            if compression == "gzip":
                data = gzip.compress(tar, 6, mtime=0)
            elif compression == "zstd":
                import zstandard

                data = zstandard.ZstdCompressor(level=3).compress(tar)
            else:
                data = tar
            return Blob(media_type, self.blob(data, media_type).digest, len(data), diff_id)
        diff_id = _sha256_file(tar)
        tmp = self.root / "blobs" / ".layer.tmp"
        compress(tar, tmp, compression)
        digest = _sha256_file(tmp)
        size = tmp.stat().st_size
        tmp.rename(self.blob_path(digest))
        return Blob(media_type, digest, size, diff_id)

    def image(
        self,
        layers: list[Blob],
        *,
        tag: str | None = None,
        flavour: str = "oci",
        architecture: str = "amd64",
        config: dict[str, Any] | None = None,
        diff_ids: list[str] | None = None,
        created_by: str = "tartarus test image",
    ) -> Blob:
        """Config + manifest for `layers`; tagged in index.json if `tag`."""
        config_doc = {
            "architecture": architecture,
            "os": "linux",
            "config": config or {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids or [layer.diff_id for layer in layers]},
            "history": [{"created_by": created_by} for _ in layers],
        }
        config_type = OCI_CONFIG if flavour == "oci" else DOCKER_CONFIG
        config_blob = self.blob(json.dumps(config_doc, sort_keys=True).encode(), config_type)
        manifest_type = OCI_MANIFEST if flavour == "oci" else DOCKER_MANIFEST
        manifest = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": config_blob.descriptor(),
            "layers": [layer.descriptor() for layer in layers],
        }
        blob = self.blob(json.dumps(manifest, indent=1).encode(), manifest_type)
        if tag:
            self.tag(blob, tag, platform={"architecture": architecture, "os": "linux"})
        return blob

    def index(self, manifests: list[tuple[Blob, str]], *, tag: str) -> Blob:
        """An image index over (manifest, architecture) pairs, tagged."""
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                m.descriptor(platform={"architecture": arch, "os": "linux"}) for m, arch in manifests
            ],
        }
        blob = self.blob(json.dumps(doc, indent=1).encode(), OCI_INDEX)
        self.tag(blob, tag)
        return blob

    def tag(self, blob: Blob, tag: str, platform: dict[str, str] | None = None) -> None:
        index = json.loads((self.root / "index.json").read_text())
        manifests = [m for m in index["manifests"] if (m.get("annotations") or {}).get(REF_ANNOTATION) != tag]
        extra: dict[str, Any] = {"annotations": {REF_ANNOTATION: tag}}
        if platform:
            extra["platform"] = platform
        manifests.append(blob.descriptor(**extra))
        self._write_index(manifests)
