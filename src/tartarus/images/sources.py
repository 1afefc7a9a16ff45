"""Where an image comes from: a registry, a local OCI layout directory, or a `docker save` tarball.

Each source resolves to a manifest (the key of the build cache) and then hands the builder one
`LayerInput` per layer, in order, as each becomes available: registry blobs download in parallel into the
blob store while earlier layers are already being applied; local blobs are read in place and verified
while they stream.

Spellings, as skopeo's: `REF` or `docker://REF`, `oci:DIR[:TAG]`, `docker-archive:FILE[:NAME:TAG]`.
"""

from __future__ import annotations

import json
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tartarus.images.errors import DigestMismatch, ImageError, ImageNotFound, InvalidReference
from tartarus.images.manifest import (
    DEFAULT_PLATFORM,
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    Descriptor,
    Manifest,
    Platform,
    document_type,
    load_json,
    parse_manifest,
    select_platform,
)
from tartarus.images.reference import Reference, digest_bytes, parse_digest, parse_reference
from tartarus.images.registry import FetchedManifest, RegistryClient, check_blob
from tartarus.images.worker import LayerInput

REF_ANNOTATION = "org.opencontainers.image.ref.name"
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Resolved:
    manifest_digest: str
    manifest: Manifest
    index_digest: str | None = None


class ImageSource(ABC):
    """One image to convert. `resolve` is cheap (one request at most) so a warm pull stays fast."""

    def __init__(self, display: str, platform: Platform) -> None:
        self.display = display
        self.platform = platform

    @abstractmethod
    def resolve(self) -> Resolved: ...

    @abstractmethod
    def config_bytes(self, resolved: Resolved) -> bytes:
        """The image config blob, verified against the manifest."""

    @abstractmethod
    def layers(
        self, resolved: Resolved, diff_ids: list[str], pool: ThreadPoolExecutor, progress: Progress
    ) -> list[Future[LayerInput]]:
        """One future per layer, in order; `progress` gets byte counts of downloads."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def _layer_what(i: int, count: int, digest: str) -> str:
    return f"layer {i + 1}/{count} ({digest[:19]})"


def _done(value: LayerInput) -> Future[LayerInput]:
    future: Future[LayerInput] = Future()
    future.set_result(value)
    return future


# ---- registry ----------------------------------------------------------------------------------


class RegistrySource(ImageSource):
    def __init__(self, ref: Reference, blob_dir: Path, *, insecure: bool, platform: Platform) -> None:
        super().__init__(str(ref), platform)
        self.ref = ref
        self.blob_dir = blob_dir
        self.client = RegistryClient(ref, insecure=insecure)

    def blob_path(self, digest: str) -> Path:
        algorithm, _, hex_ = digest.partition(":")
        return self.blob_dir / algorithm / hex_

    def resolve(self) -> Resolved:
        fetched = self.client.get_manifest(self.ref.version)
        what = self.display
        data = load_json(fetched.raw, f"{what} manifest")
        media_type = document_type(data, fetched.media_type, what)
        index_digest = None
        if media_type in INDEX_TYPES:
            index_digest = fetched.digest
            self._store(fetched.digest, fetched.raw)
            desc = select_platform(data, self.platform, what)
            stored = self.blob_path(desc.digest)
            if stored.exists():  # pulled before: the store holds it, verified (saves a request)
                fetched = FetchedManifest(stored.read_bytes(), desc.media_type, desc.digest)
            else:
                fetched = self.client.get_manifest(desc.digest)
            check_blob(fetched.raw, desc, f"{what} manifest for {self.platform}")
            data = load_json(fetched.raw, f"{what} manifest")
            media_type = document_type(data, desc.media_type or fetched.media_type, what)
            if media_type in INDEX_TYPES:
                raise ImageError(f"{what}: an index inside an index is not supported")
        manifest = parse_manifest(data, media_type, what)
        self._store(fetched.digest, fetched.raw)
        return Resolved(fetched.digest, manifest, index_digest)

    def _store(self, digest: str, data: bytes) -> None:
        path = self.blob_path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{id(data)}")
            tmp.write_bytes(data)
            tmp.replace(path)

    def config_bytes(self, resolved: Resolved) -> bytes:
        desc = resolved.manifest.config
        path = self.blob_path(desc.digest)
        if path.exists():
            data = path.read_bytes()
            check_blob(data, desc, f"{self.display} config")
            return data
        data = self.client.get_blob_bytes(desc, f"{self.display} config")
        self._store(desc.digest, data)
        return data

    def layers(
        self, resolved: Resolved, diff_ids: list[str], pool: ThreadPoolExecutor, progress: Progress
    ) -> list[Future[LayerInput]]:
        count = len(resolved.manifest.layers)

        def fetch(i: int, desc: Descriptor) -> LayerInput:
            what = f"{self.display} {_layer_what(i, count, desc.digest)}"
            path = self.blob_path(desc.digest)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                self.client.download_blob(desc, path, what, progress)
            else:
                progress(desc.size)
            return LayerInput(str(path), None, None, desc.size, diff_ids[i], what)

        return [pool.submit(fetch, i, desc) for i, desc in enumerate(resolved.manifest.layers)]

    def close(self) -> None:
        self.client.close()


# ---- OCI layout ----------------------------------------------------------------------------------


class OciLayoutSource(ImageSource):
    """A directory with `oci-layout`, `index.json` and `blobs/` (what `skopeo copy ... oci:DIR` writes)."""

    def __init__(self, root: Path, tag: str | None, platform: Platform) -> None:
        super().__init__(f"oci:{root}" + (f":{tag}" if tag else ""), platform)
        self.root = root
        self.tag = tag
        if not (root / "oci-layout").is_file() or not (root / "index.json").is_file():
            raise ImageNotFound(f"{root} is not an OCI image layout (no oci-layout or index.json)")

    def _blob(self, desc: Descriptor) -> Path:
        algorithm, _, hex_ = desc.digest.partition(":")
        path = self.root / "blobs" / algorithm / hex_
        if not path.is_file():
            raise ImageNotFound(f"{self.display}: blob {desc.digest} is missing from the layout")
        return path

    def _read(self, desc: Descriptor, what: str) -> bytes:
        path = self._blob(desc)
        if path.stat().st_size > 4 * 2**20:
            raise ImageError(f"{what}: {path.stat().st_size} bytes is too large for a manifest or config")
        data = path.read_bytes()
        check_blob(data, desc, what)
        return data

    def resolve(self) -> Resolved:
        index = load_json((self.root / "index.json").read_bytes(), f"{self.display} index.json")
        entries = [Descriptor.parse(e, f"{self.display} index.json") for e in index.get("manifests") or []]
        raw_entries = index.get("manifests") or []
        if self.tag is not None:
            picked = [
                (d, e)
                for d, e in zip(entries, raw_entries, strict=True)
                if (e.get("annotations") or {}).get(REF_ANNOTATION) == self.tag
            ]
            if not picked:
                raise ImageNotFound(f"{self.display}: no image tagged {self.tag!r} in the layout")
        else:
            picked = list(zip(entries, raw_entries, strict=True))
        index_digest = None
        if len(picked) > 1 or (picked and picked[0][0].platform is not None and not self.tag):
            desc = select_platform({"manifests": [e for _, e in picked]}, self.platform, self.display)
        elif picked:
            desc = picked[0][0]
        else:
            raise ImageNotFound(f"{self.display}: the layout holds no image")
        raw = self._read(desc, f"{self.display} manifest")
        data = load_json(raw, f"{self.display} manifest")
        media_type = document_type(data, desc.media_type, self.display)
        if media_type in INDEX_TYPES:
            index_digest = desc.digest
            desc = select_platform(data, self.platform, self.display)
            raw = self._read(desc, f"{self.display} manifest")
            data = load_json(raw, f"{self.display} manifest")
            media_type = document_type(data, desc.media_type, self.display)
            if media_type in INDEX_TYPES:
                raise ImageError(f"{self.display}: an index inside an index is not supported")
        return Resolved(desc.digest, parse_manifest(data, media_type, self.display), index_digest)

    def config_bytes(self, resolved: Resolved) -> bytes:
        return self._read(resolved.manifest.config, f"{self.display} config")

    def layers(
        self, resolved: Resolved, diff_ids: list[str], pool: ThreadPoolExecutor, progress: Progress
    ) -> list[Future[LayerInput]]:
        count = len(resolved.manifest.layers)
        out = []
        for i, desc in enumerate(resolved.manifest.layers):
            what = f"{self.display} {_layer_what(i, count, desc.digest)}"
            out.append(
                _done(LayerInput(str(self._blob(desc)), None, desc.digest, desc.size, diff_ids[i], what))
            )
        return out


# ---- docker save -------------------------------------------------------------------------------


class DockerArchiveSource(ImageSource):
    """A `docker save` tarball: `manifest.json` naming a config and layer tars by path.

    It has no registry manifest, so one is synthesised from the config digest and the diff IDs, which
    are what the layers are verified against (the tarball carries no compressed digests).
    """

    def __init__(self, path: Path, name: str | None, platform: Platform) -> None:
        super().__init__(f"docker-archive:{path}" + (f":{name}" if name else ""), platform)
        self.path = path
        self.name = name
        try:
            with tarfile.open(path, "r:") as tf:
                self._members = {_member_name(m.name): m for m in tf.getmembers()}
        except (OSError, tarfile.TarError) as e:
            raise ImageNotFound(f"{self.display}: cannot read the archive: {e}") from e
        self._config: bytes | None = None
        self._entry: dict[str, Any] = {}

    def _read_member(self, name: str) -> bytes:
        member = self._members.get(_member_name(name))
        if member is None or not member.isfile():
            raise ImageNotFound(f"{self.display}: {name} is missing from the archive")
        if member.size > 4 * 2**20:
            raise ImageError(f"{self.display}: {name} is too large for a manifest or config")
        with tarfile.open(self.path, "r:") as tf:
            f = tf.extractfile(member)
            assert f is not None
            return f.read()

    def resolve(self) -> Resolved:
        entries = load_json(self._read_member("manifest.json"), f"{self.display} manifest.json")
        if not isinstance(entries, list) or not entries:
            raise ImageError(f"{self.display}: manifest.json lists no image")
        if self.name:
            want = {self.name, str(parse_reference(self.name))}
            chosen = [
                e for e in entries if want & {t for r in e.get("RepoTags") or [] for t in (r, _canonical(r))}
            ]
            if not chosen:
                raise ImageNotFound(f"{self.display}: no image named {self.name!r} in the archive")
            entry = chosen[0]
        elif len(entries) == 1:
            entry = entries[0]
        else:
            raise ImageNotFound(f"{self.display}: the archive holds several images; name one (FILE:NAME:TAG)")
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise ImageError(f"{self.display}: malformed manifest.json entry")
        self._entry = entry
        config = self._read_member(entry["Config"])
        self._config = config
        config_desc = Descriptor(DOCKER_CONFIG, digest_bytes(config), len(config))
        diff_ids = [
            parse_digest(d) for d in (load_json(config, "config").get("rootfs") or {}).get("diff_ids") or []
        ]
        layers = entry.get("Layers") or []
        if len(layers) != len(diff_ids):
            raise ImageError(
                f"{self.display}: {len(layers)} layers but {len(diff_ids)} diff IDs in the config"
            )
        descs = [Descriptor("application/vnd.docker.image.rootfs.diff.tar", d, 0) for d in diff_ids]
        synthetic = json.dumps(
            {"config": config_desc.digest, "layers": diff_ids}, sort_keys=True, separators=(",", ":")
        ).encode()
        manifest = Manifest(config=config_desc, layers=descs, media_type=DOCKER_MANIFEST)
        return Resolved(digest_bytes(synthetic), manifest)

    def config_bytes(self, resolved: Resolved) -> bytes:
        assert self._config is not None
        if digest_bytes(self._config) != resolved.manifest.config.digest:
            raise DigestMismatch(f"{self.display}: config changed while reading")
        return self._config

    def layers(
        self, resolved: Resolved, diff_ids: list[str], pool: ThreadPoolExecutor, progress: Progress
    ) -> list[Future[LayerInput]]:
        names = self._entry.get("Layers") or []
        count = len(names)
        out = []
        for i, name in enumerate(names):
            member = self._members.get(_member_name(str(name)))
            if member is None or not member.isfile():
                raise ImageNotFound(f"{self.display}: layer {name} is missing from the archive")
            what = f"{self.display} {_layer_what(i, count, diff_ids[i])}"
            out.append(_done(LayerInput(str(self.path), member.name, None, member.size, diff_ids[i], what)))
        return out


def _member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _canonical(name: str) -> str:
    try:
        return str(parse_reference(name))
    except InvalidReference:
        return name


def open_source(
    spec: str, blob_dir: Path, *, insecure: bool = False, platform: Platform = DEFAULT_PLATFORM
) -> ImageSource:
    """The source a user's spelling names (see the module docstring)."""
    if spec.startswith("oci:"):
        rest = spec[4:]
        path, tag = (rest, None) if Path(rest).is_dir() or ":" not in rest else rest.rsplit(":", 1)
        return OciLayoutSource(Path(path), tag or None, platform)
    if spec.startswith("docker-archive:"):
        rest = spec[len("docker-archive:") :]
        path, _, name = rest.partition(":")
        if Path(rest).is_file():
            path, name = rest, ""
        return DockerArchiveSource(Path(path), name or None, platform)
    if spec.startswith("docker://"):
        spec = spec[len("docker://") :]
    return RegistrySource(parse_reference(spec), blob_dir, insecure=insecure, platform=platform)
