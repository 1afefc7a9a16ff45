"""Files in a sandbox: streamed reads and writes, listings, stat, mkdir, rename, remove."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse

from tartarus.daemon.models import FileInfoModel, FileList, MkdirRequest, RenameRequest, WriteResult
from tartarus.daemon.routes.deps import ERRORS, Manager, stream_hold
from tartarus.daemon.routes.views import file_info

router = APIRouter()

MAX_LIST_ENTRIES = 10_000  # per directory listing: bounds the daemon's memory and the response
PathQuery = Annotated[str, Query(pattern=r"^/", max_length=4095, description="absolute path in the guest")]


@router.get(
    "/v1/sandboxes/{sandbox_id}/files",
    responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS},
    response_class=StreamingResponse,
)
async def read_file(sandbox_id: str, path: PathQuery, request: Request) -> StreamingResponse:
    async with stream_hold(request, sandbox_id) as hold:
        chunks = await hold.sandbox.agent.read_file(path)
        return hold.respond(_relay(chunks), media_type="application/octet-stream")


async def _relay(chunks: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        await chunks.aclose()  # a client that left early: the guest closes the file now


@router.put("/v1/sandboxes/{sandbox_id}/files", response_model=WriteResult, responses=ERRORS)
async def write_file(
    sandbox_id: str,
    path: PathQuery,
    request: Request,
    manager: Manager,
    mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o644,
) -> WriteResult:
    async with manager.use(sandbox_id) as rt:
        size = await rt.agent.write_file(path, request.stream(), mode=mode)
    return WriteResult(path=path, size=size)


@router.delete("/v1/sandboxes/{sandbox_id}/files", status_code=204, responses=ERRORS)
async def remove_file(
    sandbox_id: str, path: PathQuery, manager: Manager, recursive: bool = False
) -> Response:
    async with manager.use(sandbox_id) as rt:
        await rt.agent.remove(path, recursive=recursive)
    return Response(status_code=204)


@router.get("/v1/sandboxes/{sandbox_id}/files/list", response_model=FileList, responses=ERRORS)
async def list_files(
    sandbox_id: str,
    path: PathQuery,
    manager: Manager,
    limit: Annotated[
        int, Query(ge=1, le=MAX_LIST_ENTRIES, description="most entries to return")
    ] = MAX_LIST_ENTRIES,
) -> FileList:
    """A directory's entries by name; in a larger directory, `limit` of them (which ones is the
    guest's directory order) with `truncated: true`, so one listing's memory stays bounded."""
    async with manager.use(sandbox_id) as rt:
        entries, truncated = await rt.agent.list(path, limit)
    return FileList(
        entries=[file_info(e) for e in sorted(entries, key=lambda e: e.name)], truncated=truncated
    )


@router.get("/v1/sandboxes/{sandbox_id}/files/stat", response_model=FileInfoModel, responses=ERRORS)
async def stat_file(sandbox_id: str, path: PathQuery, manager: Manager) -> FileInfoModel:
    async with manager.use(sandbox_id) as rt:
        return file_info(await rt.agent.stat(path))


@router.post("/v1/sandboxes/{sandbox_id}/files/mkdir", status_code=204, responses=ERRORS)
async def make_dir(sandbox_id: str, body: MkdirRequest, manager: Manager) -> Response:
    async with manager.use(sandbox_id) as rt:
        await rt.agent.mkdir(body.path, parents=body.parents)
    return Response(status_code=204)


@router.post("/v1/sandboxes/{sandbox_id}/files/rename", status_code=204, responses=ERRORS)
async def rename(sandbox_id: str, body: RenameRequest, manager: Manager) -> Response:
    async with manager.use(sandbox_id) as rt:
        await rt.agent.rename(body.path, body.new_path)
    return Response(status_code=204)
