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
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

import tartarus
from tartarus.daemon.manager import DaemonConfig, SandboxManager, SandboxRecord
from tartarus.daemon.models import (
    CheckpointInfo,
    CheckpointList,
    CodeError,
    CreateCheckpoint,
    CreateFromCheckpoint,
    CreateSandbox,
    ErrorBody,
    ErrorDetail,
    ExecEvent,
    ExecRequest,
    ExposedPort,
    ExposeRequest,
    FileInfoModel,
    FileList,
    ForkRequest,
    GcResult,
    Health,
    MkdirRequest,
    QuarantineRequest,
    RenameRequest,
    RunCodeRequest,
    RunCodeResult,
    SandboxInfo,
    SandboxList,
    TemplateInfo,
    TemplateList,
    WriteResult,
)
from tartarus.errors import GuestError, InvalidArgument, TartarusError
from tartarus.hibernation.image import Image
from tartarus.quarantine.info import containment_info
from tartarus.runtime.agent import Exit, FileInfo, Output
from tartarus.runtime.sandbox import SandboxOptions
from tartarus.templates.store import list_templates

log = logging.getLogger(__name__)

PathQuery = Annotated[str, Query(pattern=r"^/", max_length=4095, description="absolute path in the guest")]
_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody} for status in (400, 403, 404, 409, 429, 502, 507)
}


def _info(record: SandboxRecord) -> SandboxInfo:
    vm = record.runtime.vm if record.runtime else None
    image = record.image
    return SandboxInfo(
        id=record.id,
        template=record.template.name,
        state=record.state,
        error=record.error,
        created_at=record.runtime.created_at if record.runtime else record.created_at,
        idle_timeout_s=record.idle_timeout,
        disk_bytes=image.disk_bytes if image else None,
        vcpus=vm.config.vcpus if vm else image.vcpus if image else record.template.vcpus,
        memory_mib=vm.config.memory_mib if vm else image.memory_mib if image else record.template.memory_mib,
        timings_ms={k: round(v * 1000, 3) for k, v in record.timings.items()},
        restored="state_loaded" in record.timings,
        **(containment_info(record.runtime) if record.runtime else {}),
    )


def _checkpoint(image: Image) -> CheckpointInfo:
    return CheckpointInfo(
        id=image.id,
        sandbox_id=image.sandbox_id,
        template=image.template.name,
        captured_at=image.captured_at,
        disk_bytes=image.disk_bytes,
        ttl_s=image.ttl_s,
    )


def _file_model(info: FileInfo) -> FileInfoModel:
    return FileInfoModel(**info.__dict__)


def _error(exc: TartarusError) -> JSONResponse:
    errno_ = exc.errno if isinstance(exc, GuestError) else None
    body = ErrorBody(error=ErrorDetail(code=exc.code, message=exc.message, errno=errno_))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=exc.status)


def create_app(state_dir: Path, config: DaemonConfig | None = None) -> FastAPI:
    manager = SandboxManager(state_dir, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager.open()
        manager.start_pools()
        try:
            yield
        finally:
            await manager.close()

    app = FastAPI(title="Tartarus", version=tartarus.__version__, lifespan=lifespan)
    app.state.manager = manager

    @app.exception_handler(TartarusError)
    async def tartarus_error(request: Request, exc: TartarusError) -> JSONResponse:
        return _error(exc)

    @app.middleware("http")
    async def unexpected_error(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # A bug, not a client error: log it whole, answer with the documented body shape. (Starlette's
        # own catch-all re-raises after answering, and the server then resets the connection.)
        try:
            return await call_next(request)
        except Exception as exc:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            return _error(TartarusError(f"internal error: {type(exc).__name__}: {exc}"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return _error(InvalidArgument("; ".join(parts) or "invalid request"))

    @app.get("/v1/health", response_model=Health)
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
    async def create_sandbox(body: CreateSandbox) -> SandboxInfo:
        options = SandboxOptions(
            vcpus=body.vcpus,
            memory_mib=body.memory_mib,
            env=body.env,
            network=body.network,
            max_processes=body.max_processes,
            ttl_s=body.ttl_s,
        )
        return _info(await manager.create(body.template, options, body.idle_timeout_s, labels=body.labels))

    @app.get("/v1/sandboxes", response_model=SandboxList)
    async def list_sandboxes() -> SandboxList:
        return SandboxList(sandboxes=[_info(r) for r in manager.list()])

    @app.get("/v1/sandboxes/{sandbox_id}", response_model=SandboxInfo, responses=_ERRORS)
    async def get_sandbox(sandbox_id: str) -> SandboxInfo:
        return _info(manager.get(sandbox_id))

    @app.delete("/v1/sandboxes/{sandbox_id}", status_code=204, responses=_ERRORS)
    async def delete_sandbox(sandbox_id: str) -> Response:
        await manager.destroy(sandbox_id)
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/hibernate", response_model=SandboxInfo, responses=_ERRORS)
    async def hibernate(sandbox_id: str) -> SandboxInfo:
        """Put the sandbox to disk: no process, no RAM; any later call wakes it as it was."""
        return _info(await manager.hibernate(sandbox_id))

    @app.post("/v1/sandboxes/{sandbox_id}/wake", response_model=SandboxInfo, responses=_ERRORS)
    async def wake(sandbox_id: str) -> SandboxInfo:
        return _info(await manager.wake(sandbox_id))

    @app.post(
        "/v1/sandboxes/{sandbox_id}/checkpoints",
        response_model=CheckpointInfo,
        status_code=201,
        responses=_ERRORS,
    )
    async def create_checkpoint(sandbox_id: str, body: CreateCheckpoint) -> CheckpointInfo:
        """Capture the running sandbox (it runs on) as a checkpoint new sandboxes can start from."""
        return _checkpoint(await manager.checkpoint(sandbox_id, body.ttl_s))

    @app.post(
        "/v1/sandboxes/{sandbox_id}/fork", response_model=SandboxList, status_code=201, responses=_ERRORS
    )
    async def fork(sandbox_id: str, body: ForkRequest) -> SandboxList:
        return SandboxList(sandboxes=[_info(r) for r in await manager.fork(sandbox_id, body.count)])

    @app.get("/v1/checkpoints", response_model=CheckpointList)
    async def list_checkpoints() -> CheckpointList:
        return CheckpointList(checkpoints=[_checkpoint(i) for i in manager.checkpoints()])

    @app.get("/v1/checkpoints/{checkpoint_id}", response_model=CheckpointInfo, responses=_ERRORS)
    async def get_checkpoint(checkpoint_id: str) -> CheckpointInfo:
        return _checkpoint(manager.get_checkpoint(checkpoint_id))

    @app.delete("/v1/checkpoints/{checkpoint_id}", status_code=204, responses=_ERRORS)
    async def delete_checkpoint(checkpoint_id: str) -> Response:
        manager.delete_checkpoint(checkpoint_id)
        return Response(status_code=204)

    @app.post(
        "/v1/checkpoints/{checkpoint_id}/sandboxes",
        response_model=SandboxInfo,
        status_code=201,
        responses=_ERRORS,
    )
    async def create_from_checkpoint(checkpoint_id: str, body: CreateFromCheckpoint) -> SandboxInfo:
        options = SandboxOptions(env=body.env)
        return _info(await manager.create_from_checkpoint(checkpoint_id, options, body.idle_timeout_s))

    @app.post("/v1/gc", response_model=GcResult)
    async def gc() -> GcResult:
        """Delete expired checkpoints and unused snapshot pins."""
        return GcResult(**manager.gc())

    @app.post("/v1/sandboxes/{sandbox_id}/ports", response_model=ExposedPort, responses=_ERRORS)
    async def expose_port(sandbox_id: str, body: ExposeRequest) -> ExposedPort:
        """A host address forwarding TCP to a port of the guest (the guest still cannot connect out)."""
        host, host_port = await manager.expose(sandbox_id, body.port)
        return ExposedPort(port=body.port, host=host, host_port=host_port)

    @app.post("/v1/sandboxes/{sandbox_id}/quarantine", response_model=SandboxInfo, responses=_ERRORS)
    async def quarantine_sandbox(sandbox_id: str, body: QuarantineRequest) -> SandboxInfo:
        """Operator action: cut the sandbox's network now and clamp its CPU and memory, live."""
        return _info(await manager.quarantine(sandbox_id, body.reason, by="operator"))

    @app.post("/v1/sandboxes/{sandbox_id}/release", response_model=SandboxInfo, responses=_ERRORS)
    async def release_sandbox(sandbox_id: str) -> SandboxInfo:
        """Operator action: end a quarantine; the requested network and limits come back."""
        return _info(await manager.release(sandbox_id, by="operator"))

    @app.post(
        "/v1/sandboxes/{sandbox_id}/exec",
        responses={200: {"content": {"application/x-ndjson": {}}}, **_ERRORS},
        response_class=StreamingResponse,
    )
    async def exec_command(sandbox_id: str, body: ExecRequest) -> StreamingResponse:
        stdin = b""
        if body.stdin is not None:
            try:
                stdin = base64.b64decode(body.stdin, validate=True)
            except binascii.Error as e:
                raise InvalidArgument(f"stdin is not valid base64: {e}") from e
        rt = await manager.begin_call(sandbox_id)
        try:
            process = await rt.agent.exec(
                body.argv,
                env={**rt.env, **body.env},
                # Another user may not be able to enter the template's workdir: let the agent use "/".
                cwd=body.cwd or (None if body.user else rt.template.workdir),
                user=body.user,
                timeout=body.timeout,
                stdin=body.stdin is not None,
            )
        except BaseException:
            manager.end_call(sandbox_id)
            raise

        async def events() -> AsyncIterator[bytes]:
            def line(event: ExecEvent) -> bytes:
                return event.model_dump_json(exclude_none=True).encode() + b"\n"

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
                manager.end_call(sandbox_id)

        return StreamingResponse(events(), media_type="application/x-ndjson")

    @app.post("/v1/sandboxes/{sandbox_id}/code", response_model=RunCodeResult, responses=_ERRORS)
    async def run_code(sandbox_id: str, body: RunCodeRequest) -> RunCodeResult:
        """Run Python in the sandbox's warm interpreter; globals persist between calls."""
        async with manager.use(sandbox_id) as rt:
            interpreter = await rt.code_interpreter()
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
        rt = await manager.begin_call(sandbox_id)
        try:
            chunks = await rt.agent.read_file(path)
        except BaseException:
            manager.end_call(sandbox_id)
            raise

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                manager.end_call(sandbox_id)

        return StreamingResponse(stream(), media_type="application/octet-stream")

    @app.put("/v1/sandboxes/{sandbox_id}/files", response_model=WriteResult, responses=_ERRORS)
    async def write_file(
        sandbox_id: str,
        path: PathQuery,
        request: Request,
        mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o644,
    ) -> WriteResult:
        async with manager.use(sandbox_id) as rt:
            size = await rt.agent.write_file(path, request.stream(), mode=mode)
        return WriteResult(path=path, size=size)

    @app.delete("/v1/sandboxes/{sandbox_id}/files", status_code=204, responses=_ERRORS)
    async def remove_file(sandbox_id: str, path: PathQuery, recursive: bool = False) -> Response:
        async with manager.use(sandbox_id) as rt:
            await rt.agent.remove(path, recursive=recursive)
        return Response(status_code=204)

    @app.get("/v1/sandboxes/{sandbox_id}/files/list", response_model=FileList, responses=_ERRORS)
    async def list_files(sandbox_id: str, path: PathQuery) -> FileList:
        async with manager.use(sandbox_id) as rt:
            entries = await rt.agent.list(path)
        return FileList(entries=[_file_model(e) for e in sorted(entries, key=lambda e: e.name)])

    @app.get("/v1/sandboxes/{sandbox_id}/files/stat", response_model=FileInfoModel, responses=_ERRORS)
    async def stat_file(sandbox_id: str, path: PathQuery) -> FileInfoModel:
        async with manager.use(sandbox_id) as rt:
            return _file_model(await rt.agent.stat(path))

    @app.post("/v1/sandboxes/{sandbox_id}/files/mkdir", status_code=204, responses=_ERRORS)
    async def make_dir(sandbox_id: str, body: MkdirRequest) -> Response:
        async with manager.use(sandbox_id) as rt:
            await rt.agent.mkdir(body.path, parents=body.parents)
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/files/rename", status_code=204, responses=_ERRORS)
    async def rename(sandbox_id: str, body: RenameRequest) -> Response:
        async with manager.use(sandbox_id) as rt:
            await rt.agent.rename(body.path, body.new_path)
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
