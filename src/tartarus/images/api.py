"""`pull`: an image reference in, a bootable read-only root filesystem out, cached by manifest digest.

A warm pull costs one manifest request (none for a local source) plus a file read. A cold one resolves
the manifest, downloads layer blobs in parallel into the blob store, and meanwhile a worker process
applies each layer as soon as it is there and packs the filesystem (see `build.py`, `worker.py`).
Concurrent pulls of the same image wait on one lock and build once.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from tartarus.images.build import DEFAULT_FSTYPE, FSTYPES
from tartarus.images.cache import ImageBuild, ImageCache
from tartarus.images.errors import ImageError
from tartarus.images.layers import Limits
from tartarus.images.manifest import DEFAULT_PLATFORM, Platform, parse_config
from tartarus.images.sources import ImageSource, Resolved, open_source
from tartarus.images.worker import run_build
from tartarus.templates.built import Template

# progress(phase, done, total): phases "download" and "apply" count bytes of layer blobs; "resolve",
# "build" and "done" come once each with (0, 0). Called from several threads.
Progress = Callable[[str, int, int], None]
PARALLEL_DOWNLOADS = 4


def _ignore(phase: str, done: int, total: int) -> None:
    del phase, done, total


class _Counter:
    def __init__(self, phase: str, total: int, progress: Progress) -> None:
        self.phase, self.total, self.progress = phase, total, progress
        self.done = 0
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
            done = self.done
        self.progress(self.phase, done, self.total)


def pull(
    ref: str,
    *,
    insecure: bool = False,
    progress: Progress | None = None,
    platform: str | Platform = DEFAULT_PLATFORM,
    fstype: str = DEFAULT_FSTYPE,
    store: ImageCache | None = None,
    limits: Limits | None = None,
    loop: bool | None = None,
) -> ImageBuild:
    """Convert the image `ref` names into a root filesystem (or find it converted) and return it.

    `ref`: `registry/repo:tag`, `repo@sha256:…`, `docker://…`, `oci:DIR[:TAG]` or
    `docker-archive:FILE[:NAME:TAG]`. Plain HTTP is used for loopback registries or with `insecure`.
    Needs root: the filesystem is built through a loop mount, with the image's owners and devices.
    `loop=False` applies the layers to a directory and packs it with mkfs instead (slower; for hosts
    without loop devices, which `None` detects).
    """
    if fstype not in FSTYPES:
        raise ImageError(f"unknown filesystem type {fstype!r} (expected one of {', '.join(FSTYPES)})")
    report = progress or _ignore
    want = platform if isinstance(platform, Platform) else Platform.from_string(platform)
    store = store or ImageCache()
    store.ensure()
    with store.shared():
        source = open_source(ref, store.blobs, insecure=insecure, platform=want)
        try:
            report("resolve", 0, 0)
            resolved = source.resolve()
            found = store.find(resolved.manifest_digest, fstype)
            if found is None:
                if os.geteuid() != 0:
                    raise ImageError(
                        "converting an image needs root (loop mount, image owners, device nodes)"
                    )
                with store.build_lock(resolved.manifest_digest, fstype):
                    found = store.find(resolved.manifest_digest, fstype)
                    if found is None:
                        found = _convert(source, resolved, store, fstype, limits or Limits(), report, loop)
            build = store.add_ref(found, source.display)
            report("done", 0, 0)
            return build
        finally:
            source.close()


def _convert(
    source: ImageSource,
    resolved: Resolved,
    store: ImageCache,
    fstype: str,
    limits: Limits,
    report: Progress,
    loop: bool | None,
) -> ImageBuild:
    manifest = resolved.manifest
    config_raw = source.config_bytes(resolved)
    blob = parse_config(config_raw, f"{source.display} config")
    if len(blob.diff_ids) != len(manifest.layers):
        raise ImageError(
            f"{source.display}: the manifest has {len(manifest.layers)} layers "
            f"but the config {len(blob.diff_ids)} diff IDs"
        )
    total = sum(layer.size for layer in manifest.layers)
    downloaded = _Counter("download", total, report)
    applied = _Counter("apply", total, report)
    work = store.work_dir(resolved.manifest_digest, fstype)
    pool = ThreadPoolExecutor(PARALLEL_DOWNLOADS, thread_name_prefix="image-download")
    try:
        futures = source.layers(resolved, blob.diff_ids, pool, downloaded)
        result = run_build(
            work,
            fstype,
            futures,
            limits=limits,
            loop=loop,
            on_bytes=applied,
            on_stage=lambda stage: report(stage, 0, 0),
        )
        build = ImageBuild(
            rootfs=result.image,
            fstype=fstype,
            manifest_digest=resolved.manifest_digest,
            config=blob.config,
            config_digest=manifest.config.digest,
            layers=tuple(layer.digest for layer in manifest.layers),
            index_digest=resolved.index_digest,
            refs=(),
            platform=str(blob.platform),
            size=result.image.stat().st_blocks * 512,
            entries=result.entries,
            created=time.time(),
            warnings=tuple(result.warnings),
        )
        return store.publish(work, build)
    except BaseException:
        source.close()  # stops downloads still running
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def to_template(build: ImageBuild, name: str, *, vcpus: int = 1, memory_mib: int = 512) -> Template:
    """A template that boots the converted image: the guest agent lives in the initramfs, so the image
    needs nothing injected; its env and working directory become the template's."""
    return Template(
        name=name,
        key=build.key,
        rootfs=build.rootfs,
        fstype=build.fstype,
        vcpus=vcpus,
        memory_mib=memory_mib,
        env=dict(build.config.env),
        workdir=build.config.workdir or "/",
    )
