"""The REST API (/v1) over the sandbox manager.

Errors always come back as `{"error": {"code", "message"}}` with a status that matches the code; a
streamed exec reports late failures as a final `error` event instead.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import tartarus
from tartarus.daemon import control_api
from tartarus.daemon.control import ControlPlane, parse_labels, principal_of, record_id
from tartarus.daemon.manager import DaemonConfig, SandboxManager, SandboxRecord
from tartarus.daemon.models import (
    CodeError,
    CreateSandbox,
    ErrorBody,
    ErrorDetail,
    ExecEvent,
    ExecRequest,
    FileInfoModel,
    FileList,
    Health,
    MkdirRequest,
    RenameRequest,
    RunCodeRequest,
    RunCodeResult,
    SandboxInfo,
    SandboxList,
    SetTimeout,
    TemplateInfo,
    TemplateList,
    WriteResult,
)
from tartarus.daemon.requests import RequestMiddleware
from tartarus.errors import GuestError, InvalidArgument, TartarusError
from tartarus.runtime.agent import Exit, FileInfo, Output
from tartarus.runtime.sandbox import SandboxOptions
from tartarus.store import SandboxRow
from tartarus.templates.store import list_templates

log = logging.getLogger(__name__)

PathQuery = Annotated[str, Query(pattern=r"^/", max_length=4095, description="absolute path in the guest")]
_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorBody},
    401: {"model": ErrorBody},
    404: {"model": ErrorBody},
    502: {"model": ErrorBody},
}


def _info(record: SandboxRecord, owner: SandboxRow | None = None) -> SandboxInfo:
    """A live sandbox as the API shows it; `owner` adds the control plane's record (tenant, labels...)."""
    rt = record.runtime
    vm = rt.vm
    extra = (
        {
            "tenant": owner.tenant,
            "labels": owner.labels,
            "timeout": owner.timeout_s,
            "expires_at": owner.expires_at,
        }
        if owner
        else {}
    )
    return SandboxInfo(
        **extra,
        id=rt.id,
        template=rt.template.name,
        state=record.state,
        error=record.error,
        created_at=rt.created_at,
        vcpus=vm.config.vcpus if vm else rt.template.vcpus,
        memory_mib=vm.config.memory_mib if vm else rt.template.memory_mib,
        timings_ms={k: round(v * 1000, 3) for k, v in rt.timings.items()},
        restored="state_loaded" in rt.timings,
    )


def _ended_info(row: SandboxRow) -> SandboxInfo:
    """A sandbox that no longer runs, from its stored record."""
    return SandboxInfo(
        id=row.id,
        template=row.template,
        state=row.state if row.state in ("destroyed", "failed", "lost") else "destroyed",
        error=row.error,
        created_at=row.created_at,
        vcpus=row.vcpus,
        memory_mib=row.memory_mib,
        tenant=row.tenant,
        labels=row.labels,
        timeout=row.timeout_s,
        ended_at=row.ended_at,
    )


def _file_model(info: FileInfo) -> FileInfoModel:
    return FileInfoModel(**info.__dict__)


def _error(exc: TartarusError) -> JSONResponse:
    errno_ = exc.errno if isinstance(exc, GuestError) else None
    body = ErrorBody(error=ErrorDetail(code=exc.code, message=exc.message, errno=errno_))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=exc.status)


def create_app(state_dir: Path, config: DaemonConfig | None = None) -> FastAPI:
    manager = SandboxManager(state_dir, config)
    control = ControlPlane(state_dir, manager)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager.open()
        try:
            control.open()
            manager.start_pools()
            control.start()
            yield
        finally:
            await manager.close()
            await control.close()

    app = FastAPI(
        title="Tartarus",
        version=tartarus.__version__,
        lifespan=lifespan,
        # Every route needs an API key (bar health); it also hides other tenants' sandboxes.
        dependencies=[Depends(control.authorize)],
    )
    app.state.manager = manager
    app.state.control = control
    app.add_middleware(RequestMiddleware, control=control)
    app.include_router(control_api.router(control))

    @app.exception_handler(TartarusError)
    async def tartarus_error(request: Request, exc: TartarusError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a client error: log it whole, answer with the documented body shape.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(TartarusError(f"internal error: {type(exc).__name__}: {exc}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Routing errors (unknown path, wrong method) keep the documented body shape too.
        codes = {404: "not_found", 405: "method_not_allowed"}
        detail = ErrorDetail(code=codes.get(exc.status_code, "http_error"), message=str(exc.detail))
        return JSONResponse(
            ErrorBody(error=detail).model_dump(exclude_none=True), exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return _error(InvalidArgument("; ".join(parts) or "invalid request"))

    @app.get("/v1/health", response_model=Health, openapi_extra={"security": []})
    async def health() -> Health:
        from tartarus.runtime.accel import choose_accel

        accel = None
        with contextlib.suppress(TartarusError):
            from tartarus.guest.kernel import kernel_path

            accel = choose_accel(kernel_path())
        return Health(
            status="ok",
            version=tartarus.__version__,
            accel=accel,
            sandboxes=len(manager.list()),
            pooled=manager.pooled,
        )

    @app.post("/v1/sandboxes", response_model=SandboxInfo, status_code=201, responses=_ERRORS)
    async def create_sandbox(body: CreateSandbox, request: Request) -> SandboxInfo:
        """Create a sandbox owned by the caller's tenant, within its quota (429 quota_exceeded)."""
        options = SandboxOptions(vcpus=body.vcpus, memory_mib=body.memory_mib, env=body.env)
        record = await control.create(
            request, body.template, options, labels=body.labels, timeout=body.timeout, spawn=manager.create
        )
        return _info(record, control.owners.get(record_id(record)))

    @app.get("/v1/sandboxes", response_model=SandboxList, responses=_ERRORS)
    async def list_sandboxes(
        request: Request,
        label: Annotated[list[str], Query(description="key=value; repeat to require several")] = [],  # noqa: B006
        tenant: Annotated[str | None, Query(description="admins: only this tenant's")] = None,
        include_ended: Annotated[bool, Query(description="also destroyed, failed and lost ones")] = False,
    ) -> SandboxList:
        """The caller's sandboxes (an admin's: everyone's), optionally filtered by labels."""
        principal = principal_of(request)
        labels = parse_labels(label)
        shown = control.visible(principal, manager.list(), labels=labels, tenant=tenant)
        sandboxes = [_info(r, control.owners.get(record_id(r))) for r in shown]
        if include_ended:
            live = {s.id for s in sandboxes}
            ended = await control.ended(principal, labels=labels, tenant=tenant)
            sandboxes += [_ended_info(row) for row in ended if row.id not in live]
        return SandboxList(sandboxes=sandboxes)

    @app.get("/v1/sandboxes/{sandbox_id}", response_model=SandboxInfo, responses=_ERRORS)
    async def get_sandbox(sandbox_id: str) -> SandboxInfo:
        return _info(manager.get(sandbox_id), control.owners.get(sandbox_id))

    @app.put("/v1/sandboxes/{sandbox_id}/timeout", response_model=SandboxInfo, responses=_ERRORS)
    async def set_timeout(sandbox_id: str, body: SetTimeout) -> SandboxInfo:
        """Destroy the sandbox `timeout` seconds from now (null: keep it until deleted)."""
        owner = await control.set_timeout(sandbox_id, body.timeout)
        return _info(manager.get(sandbox_id), owner)

    @app.delete("/v1/sandboxes/{sandbox_id}", status_code=204, responses=_ERRORS)
    async def delete_sandbox(sandbox_id: str) -> Response:
        await manager.destroy(sandbox_id)
        return Response(status_code=204)

    @app.post(
        "/v1/sandboxes/{sandbox_id}/exec",
        responses={200: {"content": {"application/x-ndjson": {}, "text/event-stream": {}}}, **_ERRORS},
        response_class=StreamingResponse,
    )
    async def exec_command(sandbox_id: str, body: ExecRequest, request: Request) -> StreamingResponse:
        """Run a command, streaming ExecEvents as NDJSON, or as server-sent events with
        `Accept: text/event-stream` (event name = the event's type)."""
        sse = "text/event-stream" in request.headers.get("accept", "")
        record = manager.get(sandbox_id)
        rt = record.runtime
        stdin = b""
        if body.stdin is not None:
            try:
                stdin = base64.b64decode(body.stdin, validate=True)
            except binascii.Error as e:
                raise InvalidArgument(f"stdin is not valid base64: {e}") from e
        process = await rt.agent.exec(
            body.argv,
            env={**rt.env, **body.env},
            # Another user may not be able to enter the template's workdir: let the agent use "/".
            cwd=body.cwd or (None if body.user else rt.template.workdir),
            user=body.user,
            timeout=body.timeout,
            stdin=body.stdin is not None,
        )

        async def events() -> AsyncIterator[bytes]:
            def line(event: ExecEvent) -> bytes:
                data = event.model_dump_json(exclude_none=True).encode()
                return (
                    b"event: " + event.type.encode() + b"\ndata: " + data + b"\n\n" if sse else data + b"\n"
                )

            yield line(ExecEvent(type="started", pid=process.pid))
            try:
                if body.stdin is not None:
                    await process.write_stdin(stdin)
                    await process.close_stdin()
                async for event in process.events():
                    if isinstance(event, Output):
                        data = base64.b64encode(event.data).decode()
                        yield line(ExecEvent(type=event.stream, data=data))
                    elif isinstance(event, Exit):
                        yield line(
                            ExecEvent(
                                type="exit",
                                exit_code=event.exit_code,
                                signal=event.signal,
                                timed_out=event.timed_out,
                            )
                        )
            except TartarusError as e:
                errno_ = e.errno if isinstance(e, GuestError) else None
                yield line(ExecEvent(type="error", code=e.code, message=e.message, errno=errno_))
            finally:
                if process.exit is None:  # client went away or the stream failed: kill the command
                    with contextlib.suppress(Exception):
                        await process.signal(signal.SIGKILL)
                    process.abandon()

        media_type = "text/event-stream" if sse else "application/x-ndjson"
        return StreamingResponse(events(), media_type=media_type, headers={"Cache-Control": "no-cache"})

    @app.post("/v1/sandboxes/{sandbox_id}/code", response_model=RunCodeResult, responses=_ERRORS)
    async def run_code(sandbox_id: str, body: RunCodeRequest) -> RunCodeResult:
        """Run Python in the sandbox's warm interpreter; globals persist between calls."""
        interpreter = await manager.get(sandbox_id).runtime.code_interpreter()
        execution = await interpreter.run_code(body.code, body.timeout)
        error = execution.error
        return RunCodeResult(
            stdout=execution.stdout,
            stderr=execution.stderr,
            result=execution.result,
            error=None
            if error is None
            else CodeError(name=error.name, value=error.value, traceback=error.traceback),
        )

    @app.get(
        "/v1/sandboxes/{sandbox_id}/files",
        responses={200: {"content": {"application/octet-stream": {}}}, **_ERRORS},
        response_class=StreamingResponse,
    )
    async def read_file(sandbox_id: str, path: PathQuery) -> StreamingResponse:
        chunks = await manager.get(sandbox_id).runtime.agent.read_file(path)
        return StreamingResponse(chunks, media_type="application/octet-stream")

    @app.put("/v1/sandboxes/{sandbox_id}/files", response_model=WriteResult, responses=_ERRORS)
    async def write_file(
        sandbox_id: str,
        path: PathQuery,
        request: Request,
        mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o644,
    ) -> WriteResult:
        agent = manager.get(sandbox_id).runtime.agent
        size = await agent.write_file(path, request.stream(), mode=mode)
        return WriteResult(path=path, size=size)

    @app.delete("/v1/sandboxes/{sandbox_id}/files", status_code=204, responses=_ERRORS)
    async def remove_file(sandbox_id: str, path: PathQuery, recursive: bool = False) -> Response:
        await manager.get(sandbox_id).runtime.agent.remove(path, recursive=recursive)
        return Response(status_code=204)

    @app.get("/v1/sandboxes/{sandbox_id}/files/list", response_model=FileList, responses=_ERRORS)
    async def list_files(sandbox_id: str, path: PathQuery) -> FileList:
        entries = await manager.get(sandbox_id).runtime.agent.list(path)
        return FileList(entries=[_file_model(e) for e in sorted(entries, key=lambda e: e.name)])

    @app.get("/v1/sandboxes/{sandbox_id}/files/stat", response_model=FileInfoModel, responses=_ERRORS)
    async def stat_file(sandbox_id: str, path: PathQuery) -> FileInfoModel:
        return _file_model(await manager.get(sandbox_id).runtime.agent.stat(path))

    @app.post("/v1/sandboxes/{sandbox_id}/files/mkdir", status_code=204, responses=_ERRORS)
    async def make_dir(sandbox_id: str, body: MkdirRequest) -> Response:
        await manager.get(sandbox_id).runtime.agent.mkdir(body.path, parents=body.parents)
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/files/rename", status_code=204, responses=_ERRORS)
    async def rename(sandbox_id: str, body: RenameRequest) -> Response:
        await manager.get(sandbox_id).runtime.agent.rename(body.path, body.new_path)
        return Response(status_code=204)

    @app.get("/v1/templates", response_model=TemplateList)
    async def templates() -> TemplateList:
        return TemplateList(
            templates=[
                TemplateInfo(name=t.name, key=t.key, fstype=t.fstype, vcpus=t.vcpus, memory_mib=t.memory_mib)
                for t in list_templates()
            ]
        )

    return app


def dumps_openapi(app: FastAPI) -> str:
    return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"
