"""Images: the cache of OCI images converted into root filesystems.

`POST /v1/images` pulls a registry reference and converts it (admin only: it makes the daemon's host
fetch from a registry and spend minutes of CPU and disk); the conversion runs on a worker thread, never
on the event loop. Local sources (`oci:DIR`, `docker-archive:FILE`) name files on the daemon's host and
stay with the CLI there. Errors are the API's: a bad reference 400, unknown image 404, a registry that
cannot be used 502 `registry_error`, an image that cannot be converted 422 `invalid_image`.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from tartarus.daemon.models import ErrorBody
from tartarus.daemon.routes.deps import AdminOnly, Caller, Control, Daemon, daemon_parts
from tartarus.errors import (
    Conflict,
    InvalidArgument,
    InvalidImage,
    NotFound,
    RegistryUnavailable,
    TartarusError,
)
from tartarus.images.cache import ImageBuild, ImageCache
from tartarus.images.errors import ImageError, RegistryAuthError, RegistryError

DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 422, 502)
}


class PullImage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: str = Field(
        min_length=1,
        max_length=512,
        examples=["127.0.0.1:5000/python:3.11-slim"],
        description="registry reference: [registry/]repo[:tag][@digest], optionally docker://",
    )
    fstype: Literal["ext4", "erofs"] = "ext4"
    platform: str = Field(
        "linux/amd64", pattern=r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$", description="picked from an index"
    )
    insecure: bool = Field(False, description="plain HTTP to a registry that is not on loopback")


class ImageInfo(BaseModel):
    digest: str = Field(description="manifest digest: what the image is cached by")
    references: list[str] = Field(description="the references it was pulled as")
    fstype: str
    platform: str
    size: int = Field(description="bytes the root filesystem takes on disk")
    created: float = Field(description="when it was converted (unix time)")
    layers: int
    warnings: list[str] = Field(default_factory=list)


class ImageList(BaseModel):
    images: list[ImageInfo]


LOCAL_SOURCE = re.compile(r"^(oci|oci-archive|docker-archive|dir):")


def _info(build: ImageBuild, *, admin: bool = True) -> ImageInfo:
    """An image as the API shows it. Non-admins do not see where on the host a local source was read
    from (`oci:/path`, `docker-archive:/path`): such references are left out and warnings say
    "local image" instead."""
    references, warnings = list(build.refs), list(build.warnings)
    if not admin:
        local = [r for r in references if LOCAL_SOURCE.match(r)]
        references = [r for r in references if r not in local]
        for ref in sorted(local, key=len, reverse=True):
            warnings = [w.replace(ref, "local image") for w in warnings]
    return ImageInfo(
        digest=build.manifest_digest,
        references=references,
        fstype=build.fstype,
        platform=build.platform,
        size=build.size,
        created=build.created,
        layers=len(build.layers),
        warnings=warnings,
    )


def registry_reference(text: str) -> str:
    """A registry reference the API may pull: no local sources (they are files on the daemon's host)."""
    from tartarus.images.reference import parse_reference

    if LOCAL_SOURCE.match(text):
        raise InvalidArgument(
            f"{text!r}: the API pulls from registries only; convert local layouts and archives with "
            "`tartarus image pull` on the daemon's host"
        )
    reference = text.removeprefix("docker://")
    parse_reference(reference)  # InvalidReference (400) with what is wrong
    return reference


def api_error(e: ImageError) -> TartarusError:
    """The API's error for a failed conversion: never a 500, and never `unauthorized` (which would say
    the caller's own key was refused)."""
    if isinstance(e, InvalidArgument | NotFound):
        return e
    if isinstance(e, RegistryAuthError):
        return RegistryUnavailable(f"the registry refused access: {e.message}")
    if isinstance(e, RegistryError):
        return RegistryUnavailable(e.message)
    return InvalidImage(e.message)


router = APIRouter(tags=["images"])
Parts = Annotated[Daemon, Depends(daemon_parts)]


def _pull(body: PullImage, reference: str, store: ImageCache) -> tuple[ImageBuild, bool]:
    """Convert (or find converted) on this worker thread; returns the build and whether it was
    already in the cache."""
    from tartarus.images.api import pull as convert

    phases: set[str] = set()
    lock = threading.Lock()

    def progress(phase: str, done: int, total: int) -> None:
        with lock:
            phases.add(phase)

    build = convert(
        reference,
        insecure=body.insecure,
        platform=body.platform,
        fstype=body.fstype,
        store=store,
        progress=progress,
    )
    return build, not phases - {"resolve", "done"}


@router.get("/v1/images", response_model=ImageList, responses=_ERRORS)
async def list_images(caller: Caller, parts: Parts) -> ImageList:
    """Converted images in this host's cache, oldest first; local sources' host paths: admins only."""
    builds = await asyncio.to_thread(parts.images.all)
    return ImageList(images=[_info(b, admin=caller.admin) for b in builds])


@router.post(
    "/v1/images",
    response_model=ImageInfo,
    status_code=201,
    responses={200: {"model": ImageInfo, "description": "already converted"}, **_ERRORS},
    dependencies=AdminOnly,
)
async def pull_image(
    body: PullImage, request: Request, response: Response, parts: Parts, control: Control
) -> ImageInfo:
    """Pull a registry image and convert it into a root filesystem: 201 when converted now, 200
    when it was in the cache. Admin only. Blocks until done (seconds to minutes)."""
    reference = registry_reference(body.reference)
    request.state.audit_detail = {"reference": reference, "fstype": body.fstype}
    async with parts.conversions:
        started = time.perf_counter()
        try:
            build, cached = await asyncio.to_thread(_pull, body, reference, parts.images)
        except ImageError as e:
            raise api_error(e) from e
        elapsed = time.perf_counter() - started
    control.metrics.image_convert_seconds.labels("hit" if cached else "miss").observe(elapsed)
    request.state.audit_target = build.manifest_digest
    response.status_code = 200 if cached else 201
    return _info(build)


@router.delete("/v1/images/{digest}", status_code=204, responses=_ERRORS, dependencies=AdminOnly)
async def delete_image(
    digest: Annotated[str, Path(pattern=DIGEST_PATTERN)], request: Request, parts: Parts
) -> Response:
    """Delete a converted image (every filesystem type of it). 409 while a template boots from it.
    Admin only. Its blobs stay until `tartarus image prune`."""
    request.state.audit_target = digest
    await asyncio.to_thread(_delete, parts.images, digest)
    return Response(status_code=204)


def _delete(store: ImageCache, digest: str) -> None:
    from tartarus.templates.built import list_templates

    builds = [b for b in store.all() if b.manifest_digest == digest]
    if not builds:
        raise NotFound(f"no converted image {digest!r}")
    dirs = {b.rootfs.parent for b in builds}
    users = [t.name for t in list_templates() if t.rootfs.parent in dirs]
    if users:
        raise Conflict(f"image {digest} is the root filesystem of template(s) {', '.join(users)}")
    try:
        store.remove(digest)
    except ImageError as e:
        raise api_error(e) from e
