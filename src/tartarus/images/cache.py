"""The content-addressed image cache, under `<cache>/images/`:

    blobs/sha256/<hex>                       verified registry blobs: manifests, indexes, configs, layers
    builds/<alg>-<hex>-<fstype>.<version>/   one converted image per manifest digest and builder version
        rootfs.<fstype>                      the read-only base image
        image.json                           the record: refs, digests, platform, run config, sizes
    locks/                                   one flock per build key: concurrent pulls build once
    tmp/                                     work in progress, renamed into builds/ when complete
    .gc.lock                                 pulls hold it shared, `rm` and `prune` exclusive

A build directory appears only complete (renamed from `tmp/` as a whole), so a crash never leaves a
half image that looks finished; `prune` clears what crashed pulls left in `tmp/`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tartarus.images.build import builder_key
from tartarus.images.errors import ImageNotFound
from tartarus.images.manifest import ImageConfig
from tartarus.images.reference import parse_digest
from tartarus.paths import cache_dir


@dataclass(frozen=True)
class ImageBuild:
    """A converted image: what `tartarus.images.pull` returns and `image.json` records."""

    rootfs: Path
    fstype: str  # "ext4" or "erofs"
    manifest_digest: str
    config: ImageConfig
    config_digest: str = ""
    layers: tuple[str, ...] = ()  # layer blob digests
    index_digest: str | None = None
    refs: tuple[str, ...] = ()
    platform: str = ""
    size: int = 0  # bytes the image takes on disk (it is sparse)
    entries: int = 0
    created: float = 0.0
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def key(self) -> str:
        return self.rootfs.parent.name

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "rootfs": self.rootfs.name,
            "fstype": self.fstype,
            "manifest_digest": self.manifest_digest,
            "config": self.config.to_json(),
            "config_digest": self.config_digest,
            "layers": list(self.layers),
            "index_digest": self.index_digest,
            "refs": list(self.refs),
            "platform": self.platform,
            "size": self.size,
            "entries": self.entries,
            "created": self.created,
            "warnings": list(self.warnings),
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_dir(cls, path: Path) -> ImageBuild:
        data = json.loads((path / "image.json").read_text())
        return cls(
            rootfs=path / data["rootfs"],
            fstype=data["fstype"],
            manifest_digest=data["manifest_digest"],
            config=ImageConfig.from_json(data["config"]),
            config_digest=data.get("config_digest", ""),
            layers=tuple(data.get("layers", ())),
            index_digest=data.get("index_digest"),
            refs=tuple(data.get("refs", ())),
            platform=data.get("platform", ""),
            size=int(data.get("size", 0)),
            entries=int(data.get("entries", 0)),
            created=float(data.get("created", 0.0)),
            warnings=tuple(data.get("warnings", ())),
        )


@dataclass(frozen=True)
class PruneReport:
    blobs: int
    bytes: int
    tmp_entries: int


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class ImageCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_dir() / "images"
        self.blobs = self.root / "blobs"
        self.builds = self.root / "builds"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"

    def ensure(self) -> None:
        for d in (self.blobs, self.builds, self.tmp, self.locks):
            d.mkdir(parents=True, exist_ok=True)

    # ---- locking -------------------------------------------------------------------------------

    def shared(self) -> contextlib.AbstractContextManager[None]:
        """Held by pulls: blobs and builds they may be using are not collected meanwhile."""
        return _flock(self.root / ".gc.lock", fcntl.LOCK_SH)

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return _flock(self.root / ".gc.lock", fcntl.LOCK_EX)

    def build_lock(self, manifest_digest: str, fstype: str) -> contextlib.AbstractContextManager[None]:
        return _flock(self.locks / f"{self.build_name(manifest_digest, fstype)}.lock", fcntl.LOCK_EX)

    # ---- builds --------------------------------------------------------------------------------

    @staticmethod
    def build_name(manifest_digest: str, fstype: str) -> str:
        algorithm, _, hex_ = parse_digest(manifest_digest).partition(":")
        return f"{algorithm}-{hex_}-{builder_key(fstype)}"

    def build_dir(self, manifest_digest: str, fstype: str) -> Path:
        return self.builds / self.build_name(manifest_digest, fstype)

    def find(self, manifest_digest: str, fstype: str) -> ImageBuild | None:
        path = self.build_dir(manifest_digest, fstype)
        try:
            return ImageBuild.from_dir(path)
        except FileNotFoundError:
            return None

    def work_dir(self, manifest_digest: str, fstype: str) -> Path:
        self.tmp.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{self.build_name(manifest_digest, fstype)}.", dir=self.tmp))

    def publish(self, work: Path, build: ImageBuild) -> ImageBuild:
        """Record `build` (whose files are in `work`) and move it into place atomically."""
        final = self.build_dir(build.manifest_digest, build.fstype)
        placed = replace(build, rootfs=final / build.rootfs.name)
        (work / "image.json").write_text(placed.to_json())
        work.rename(final)
        return placed

    def add_ref(self, build: ImageBuild, ref: str) -> ImageBuild:
        if ref in build.refs:
            return build
        with self.build_lock(build.manifest_digest, build.fstype):
            current = self.find(build.manifest_digest, build.fstype) or build
            if ref in current.refs:
                return current
            updated = replace(current, refs=(*current.refs, ref))
            _atomic_write(current.rootfs.parent / "image.json", updated.to_json())
            return updated

    def all(self) -> list[ImageBuild]:
        if not self.builds.exists():
            return []
        found = []
        for path in self.builds.iterdir():
            with contextlib.suppress(OSError, ValueError, KeyError):
                found.append(ImageBuild.from_dir(path))
        return sorted(found, key=lambda b: b.created)

    def match(self, spec: str) -> list[ImageBuild]:
        """Builds named by `spec`: a ref they were pulled as, or a prefix of their manifest digest."""
        from tartarus.images.reference import parse_reference

        names = {spec}
        with contextlib.suppress(Exception):
            names.add(str(parse_reference(spec.removeprefix("docker://"))))
        digest = spec if ":" in spec and spec.split(":", 1)[0] in ("sha256", "sha512") else f"sha256:{spec}"
        out = []
        for build in self.all():
            if names & set(build.refs) or (len(spec) >= 12 and build.manifest_digest.startswith(digest)):
                out.append(build)
        return out

    def remove(self, spec: str) -> list[ImageBuild]:
        """Delete the builds `spec` names (their blobs stay until `prune`)."""
        with self.exclusive():
            builds = self.match(spec)
            if not builds:
                raise ImageNotFound(f"no converted image matches {spec!r} (see `tartarus image ls`)")
            for build in builds:
                shutil.rmtree(build.rootfs.parent)
        return builds

    # ---- collection ----------------------------------------------------------------------------

    def prune(self) -> PruneReport:
        """Delete blobs no build refers to, and what interrupted pulls left in tmp/."""
        with self.exclusive():
            keep: set[str] = set()
            for build in self.all():
                keep.update([build.manifest_digest, build.config_digest, *build.layers])
                if build.index_digest:
                    keep.add(build.index_digest)
            count = freed = 0
            if self.blobs.exists():
                for algorithm_dir in self.blobs.iterdir():
                    for blob in algorithm_dir.iterdir():
                        if f"{algorithm_dir.name}:{blob.name}" in keep:
                            continue
                        freed += blob.stat().st_blocks * 512
                        blob.unlink()
                        count += 1
            leftovers = 0
            if self.tmp.exists():
                for entry in self.tmp.iterdir():
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                    leftovers += 1
        return PruneReport(count, freed, leftovers)
