"""The REST API (/v1) over the sandbox manager.

Errors always come back as `{"error": {"code", "message"}}` with a status that matches the code; a
streamed exec reports late failures as a final `error` event instead.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import tartarus
from tartarus.daemon import control_api, images_api, quotas, readiness, terminal
from tartarus.daemon.asgi import error_response
from tartarus.daemon.auth import Principal
from tartarus.daemon.control import PUBLIC_ROUTES, ControlPlane, parse_labels, principal_of
from tartarus.daemon.gate import Gate
from tartarus.daemon.logs import new_request_id, request_id
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
    ReadyCheck,
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
from tartarus.errors import GuestError, InvalidArgument, NotFound, NotReady, TartarusError
from tartarus.hibernation.image import Image
from tartarus.images.store import ImageStore
from tartarus.quarantine.info import containment_info
from tartarus.runtime.agent import Exit, FileInfo, Output, PtySize
from tartarus.runtime.protocol import PTY_MAX_SIZE
from tartarus.runtime.sandbox import RuntimeSandbox, SandboxOptions
from tartarus.store import SandboxRow
from tartarus.templates.store import list_templates

log = logging.getLogger(__name__)

MAX_LIST_ENTRIES = 10_000  # per directory listing: bounds the daemon's memory and the response
PathQuery = Annotated[str, Query(pattern=r"^/", max_length=4095, description="absolute path in the guest")]
_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 423, 429, 502, 507)
}


def _info(record: SandboxRecord, owner: SandboxRow | None = None) -> SandboxInfo:
    """A sandbox as the API shows it; `owner` adds the control plane's record (tenant, labels...)."""
    vm = record.runtime.vm if record.runtime else None
    image = record.image
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
        **{**(containment_info(record.runtime) if record.runtime else {}), **extra},
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


def _operator(principal: Principal) -> str:
    """Who a quarantine or release is recorded as done by: the admin key, and its tenant."""
    return f"operator:{principal.key_id}@{principal.tenant}"


class UnexpectedErrors:
    """A bug, not a client error: log it whole and answer with the documented body shape. (Starlette's
    own catch-all re-raises after answering, and the server then resets the connection.) Plain ASGI:
    `@app.middleware("http")` would pass every response, streamed ones too, through an extra task and
    memory streams. The answer names the request id, never the exception: its text can hold host
    paths and other tenants' names; the log line under that id has it whole."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            rid = scope.get("state", {}).get("request_id") or new_request_id(None)
            token = request_id.set(rid)
            try:
                log.exception("unhandled error on %s %s", scope["method"], scope.get("path", ""))
            finally:
                request_id.reset(token)
            if started:
                raise  # too late for an error body: the server closes the connection
            response = error_response(TartarusError(f"internal error (request {rid}): see the daemon's log"))
            response.headers["x-request-id"] = rid
            await response(scope, receive, send)


def create_app(state_dir: Path, config: DaemonConfig | None = None) -> FastAPI:
    manager = SandboxManager(state_dir, config)
    control = ControlPlane(state_dir, manager)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager.open()
        try:
            await manager.adopt_running()
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
        # FastAPI's own /openapi.json and docs pages would bypass that: the document is served below,
        # behind the same key, and `tartarus openapi` writes it from the app object.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.manager = manager
    app.state.control = control
    app.add_middleware(Gate, control=control, public=PUBLIC_ROUTES)  # before any body is read
    app.add_middleware(RequestMiddleware, control=control)  # outside the gate: refusals are logged
    app.add_middleware(UnexpectedErrors)  # outside RequestMiddleware: catches what escapes it too
    app.include_router(control_api.router(control))
    app.include_router(images_api.router(control, ImageStore(manager.config.image_root)))

    @app.exception_handler(TartarusError)
    async def tartarus_error(request: Request, exc: TartarusError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Routing errors (unknown path, wrong method) keep the documented body shape too.
        codes = {404: "not_found", 405: "method_not_allowed"}
        detail = ErrorDetail(code=codes.get(exc.status_code, "http_error"), message=str(exc.detail))
        return JSONResponse(
            ErrorBody(error=detail).model_dump(exclude_none=True), exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(WebSocketRequestValidationError)
    async def validation_error(
        request: Request, exc: RequestValidationError | WebSocketRequestValidationError
    ) -> JSONResponse:
        # A WebSocket handshake gets the same body, as an HTTP response refusing the upgrade.
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error_response(InvalidArgument("; ".join(parts) or "invalid request"))

    @app.get(
        "/v1/health",
        response_model=Health,
        response_model_exclude_none=True,
        responses={503: {"model": ErrorBody, "description": "not ready (with ready=true)"}},
        openapi_extra={"security": []},
    )
    async def health(
        ready: Annotated[
            bool,
            Query(description="also run the readiness checks: 503 not_ready, naming each failed check"),
        ] = False,
    ) -> Health:
        """Liveness, and with `ready=true` readiness: store, state dir, guest kernel, a template
        snapshot. No key needed (load balancers probe it); it reveals no tenant's data."""
        from tartarus.runtime.accel import choose_accel

        checks = None
        if ready:
            found = await readiness.check(state_dir, control.ping)
            failed = [c for c in found if not c.ok]
            if failed:
                message = "not ready: " + "; ".join(f"{c.name}: {c.message}" for c in failed)
                raise NotReady(message, [c.__dict__ for c in found])
            checks = [ReadyCheck(name=c.name, ok=c.ok, message=c.message) for c in found]

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
            ready=True if ready else None,
            checks=checks,
        )

    @app.post("/v1/sandboxes", response_model=SandboxInfo, status_code=201, responses=_ERRORS)
    async def create_sandbox(body: CreateSandbox, request: Request) -> SandboxInfo:
        """Create a sandbox owned by the caller's tenant, within its quota (429 quota_exceeded) and the
        host's policy (403 policy_denied, or admitted into quarantine)."""
        options = SandboxOptions(
            vcpus=body.vcpus,
            memory_mib=body.memory_mib,
            env=body.env,
            network=body.network,
            max_processes=body.max_processes,
            disk_mib=body.disk_mib,
            ttl_s=body.timeout,  # capped by the policy; the control plane keeps it durable and settable
        )

        async def spawn(template: str, options: SandboxOptions) -> SandboxRecord:
            tenant = principal_of(request).tenant
            return await manager.create(
                template, options, body.idle_timeout_s, tenant=tenant, labels=body.labels
            )

        record = await control.create(
            request, body.template, options, labels=body.labels, timeout=body.timeout, spawn=spawn
        )
        return _info(record, control.owners.get(record.id))

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
        sandboxes = [_info(r, control.owners.get(r.id)) for r in shown]
        if include_ended:
            await control.sync_all()  # sandboxes that ended since the watcher last looked
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

    @app.post("/v1/sandboxes/{sandbox_id}/hibernate", response_model=SandboxInfo, responses=_ERRORS)
    async def hibernate(sandbox_id: str) -> SandboxInfo:
        """Put the sandbox to disk: no process, no RAM; any later call wakes it as it was."""
        return _info(await manager.hibernate(sandbox_id), control.owners.get(sandbox_id))

    @app.post("/v1/sandboxes/{sandbox_id}/wake", response_model=SandboxInfo, responses=_ERRORS)
    async def wake(sandbox_id: str) -> SandboxInfo:
        return _info(await manager.wake(sandbox_id), control.owners.get(sandbox_id))

    @app.post(
        "/v1/sandboxes/{sandbox_id}/checkpoints",
        response_model=CheckpointInfo,
        status_code=201,
        responses=_ERRORS,
    )
    async def create_checkpoint(sandbox_id: str, body: CreateCheckpoint) -> CheckpointInfo:
        """Capture the running sandbox (it runs on) as a checkpoint new sandboxes can start from; its
        tenant's `max_checkpoints` quota counts it (429 quota_exceeded) until it is deleted or expires."""
        tenant = manager.get(sandbox_id).tenant  # the checkpoint's owner, as its record will say
        async with control.admitted(tenant, quotas.Usage(checkpoints=1)):
            image = await manager.checkpoint(sandbox_id, body.ttl_s)
        return _checkpoint(image)

    @app.post(
        "/v1/sandboxes/{sandbox_id}/fork", response_model=SandboxList, status_code=201, responses=_ERRORS
    )
    async def fork(sandbox_id: str, body: ForkRequest, request: Request) -> SandboxList:
        """Running copies of the sandbox, owned by the caller's tenant and counted against its quota."""
        source = control.owners.get(sandbox_id)
        vcpus, memory = (source.vcpus, source.memory_mib) if source else (0, 0)
        with control.admission(request, quotas.Usage(body.count, body.count * vcpus, body.count * memory)):
            copies = await manager.fork(sandbox_id, body.count)
            owners = [control.adopt(request, r, labels=r.labels, timeout=None) for r in copies]
        await control.persist(owners)
        return SandboxList(sandboxes=[_info(r, o) for r, o in zip(copies, owners, strict=True)])

    def _own_checkpoint(request: Request, checkpoint_id: str) -> Image:
        """A checkpoint the caller may use: its tenant's (an admin's: any); others' answer 404."""
        image = manager.get_checkpoint(checkpoint_id)
        principal = principal_of(request)
        if not principal.admin and image.request.get("tenant") != principal.tenant:
            raise NotFound(f"no checkpoint {checkpoint_id!r}")
        return image

    @app.get("/v1/checkpoints", response_model=CheckpointList)
    async def list_checkpoints(request: Request) -> CheckpointList:
        principal = principal_of(request)
        mine = [
            i for i in manager.checkpoints() if principal.admin or i.request.get("tenant") == principal.tenant
        ]
        return CheckpointList(checkpoints=[_checkpoint(i) for i in mine])

    @app.get("/v1/checkpoints/{checkpoint_id}", response_model=CheckpointInfo, responses=_ERRORS)
    async def get_checkpoint(checkpoint_id: str, request: Request) -> CheckpointInfo:
        return _checkpoint(_own_checkpoint(request, checkpoint_id))

    @app.delete("/v1/checkpoints/{checkpoint_id}", status_code=204, responses=_ERRORS)
    async def delete_checkpoint(checkpoint_id: str, request: Request) -> Response:
        manager.delete_checkpoint(_own_checkpoint(request, checkpoint_id).id)
        return Response(status_code=204)

    @app.post(
        "/v1/checkpoints/{checkpoint_id}/sandboxes",
        response_model=SandboxInfo,
        status_code=201,
        responses=_ERRORS,
    )
    async def create_from_checkpoint(
        checkpoint_id: str, body: CreateFromCheckpoint, request: Request
    ) -> SandboxInfo:
        image = _own_checkpoint(request, checkpoint_id)
        with control.admission(request, quotas.Usage(1, image.vcpus, image.memory_mib)):
            record = await manager.create_from_checkpoint(
                image.id, SandboxOptions(env=body.env), body.idle_timeout_s
            )
            owner = control.adopt(request, record, labels=record.labels, timeout=None)
        await control.persist([owner])
        return _info(record, owner)

    @app.post("/v1/gc", response_model=GcResult, dependencies=[Depends(control.require_admin)])
    async def gc() -> GcResult:
        """Delete expired checkpoints and unused snapshot pins; remove network namespaces (and their
        uplinks and cgroups) whose sandbox directory is gone, whichever daemon on this host made them."""
        return GcResult(**manager.gc())

    @app.post("/v1/sandboxes/{sandbox_id}/ports", response_model=ExposedPort, responses=_ERRORS)
    async def expose_port(sandbox_id: str, body: ExposeRequest) -> ExposedPort:
        """A host address forwarding TCP to a port of the guest (the guest still cannot connect out);
        with `secure`, only for connections that present the traffic token. 429 quota_exceeded past the
        policy's bounds on exposed ports per sandbox and per tenant."""
        e = await manager.expose(sandbox_id, body.port, body.secure)
        return ExposedPort(port=e.guest_port, host=e.host, host_port=e.host_port, traffic_token=e.token)

    @app.delete("/v1/sandboxes/{sandbox_id}/ports/{port}", status_code=204, responses=_ERRORS)
    async def unexpose_port(sandbox_id: str, port: int) -> Response:
        """Stop forwarding a guest port (its connections end), freeing its place in the bounds."""
        await manager.unexpose(sandbox_id, port)
        return Response(status_code=204)

    @app.post(
        "/v1/sandboxes/{sandbox_id}/quarantine",
        response_model=SandboxInfo,
        responses=_ERRORS,
        dependencies=[Depends(control.require_admin)],
    )
    async def quarantine_sandbox(sandbox_id: str, body: QuarantineRequest, request: Request) -> SandboxInfo:
        """Operator action (admin key): cut the sandbox's network now and clamp its CPU and memory."""
        by = _operator(principal_of(request))
        return _info(await manager.quarantine(sandbox_id, body.reason, by=by))

    @app.post(
        "/v1/sandboxes/{sandbox_id}/release",
        response_model=SandboxInfo,
        responses=_ERRORS,
        dependencies=[Depends(control.require_admin)],
    )
    async def release_sandbox(sandbox_id: str, request: Request) -> SandboxInfo:
        """Operator action (admin key): end a quarantine; the requested network and limits come back.
        A tenant cannot lift a verdict on its own sandbox."""
        return _info(await manager.release(sandbox_id, by=_operator(principal_of(request))))

    async def begin_stream(
        connection: HTTPConnection, sandbox_id: str
    ) -> tuple[RuntimeSandbox, Callable[[], None]]:
        """A streaming call's hold on its sandbox (no idle hibernation while it lasts) and its slot among
        the tenant's open streams; `end` gives both back."""
        release = control.open_stream(connection)
        try:
            rt = await manager.begin_call(sandbox_id)
        except BaseException:
            release()
            raise

        def end() -> None:
            manager.end_call(sandbox_id)
            release()

        return rt, end

    @app.post(
        "/v1/sandboxes/{sandbox_id}/exec",
        responses={200: {"content": {"application/x-ndjson": {}, "text/event-stream": {}}}, **_ERRORS},
        response_class=StreamingResponse,
    )
    async def exec_command(sandbox_id: str, body: ExecRequest, request: Request) -> StreamingResponse:
        """Run a command, streaming ExecEvents as NDJSON, or as server-sent events with
        `Accept: text/event-stream` (event name = the event's type)."""
        sse = "text/event-stream" in request.headers.get("accept", "")
        stdin = b""
        if body.stdin is not None:
            try:
                stdin = base64.b64decode(body.stdin, validate=True)
            except ValueError as e:  # binascii.Error, or characters that are not ASCII at all
                raise InvalidArgument(f"stdin is not valid base64: {e}") from e
        rt, end = await begin_stream(request, sandbox_id)
        try:
            process = await rt.agent.exec(
                body.argv,
                env={**rt.env, **body.env},
                # Another user may not be able to enter the template's workdir: let the agent use "/".
                cwd=body.cwd or (None if body.user else rt.template.workdir),
                user=body.user,
                timeout=body.timeout,
                stdin=body.stdin is not None,
                pty=PtySize(body.pty.rows, body.pty.cols) if body.pty else None,
            )
        except BaseException:
            end()
            raise

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
                end()

        media_type = "text/event-stream" if sse else "application/x-ndjson"
        return StreamingResponse(events(), media_type=media_type, headers={"Cache-Control": "no-cache"})

    @app.websocket("/v1/sandboxes/{sandbox_id}/pty")
    async def pty_session(
        websocket: WebSocket,
        sandbox_id: str,
        argv: Annotated[list[str], Query(max_length=4096)] = [],  # noqa: B006
        rows: Annotated[int, Query(ge=1, le=PTY_MAX_SIZE)] = 24,
        cols: Annotated[int, Query(ge=1, le=PTY_MAX_SIZE)] = 80,
        env: Annotated[list[str], Query(max_length=4096)] = [],  # noqa: B006
        cwd: Annotated[str | None, Query(pattern=r"^/", max_length=4095)] = None,
        user: Annotated[str | None, Query(pattern=r"^[a-z_][a-z0-9_-]*\$?$", max_length=32)] = None,
    ) -> None:
        """An interactive terminal (docs/control-plane.md): `argv` (default: bash, else sh) on a
        pseudo-terminal; the command is killed when the socket closes. Refusals (auth, unknown
        sandbox, a command that cannot start) are HTTP error responses to the handshake."""
        variables = terminal.parse_env(env)
        rt, end = await begin_stream(websocket, sandbox_id)  # held for the whole session: no idle hibernation
        try:
            if not argv:
                try:
                    await rt.agent.stat("/bin/bash")
                    argv = ["/bin/bash"]
                except GuestError:
                    argv = ["/bin/sh"]
            websocket.state.audit_detail = {"argv": argv, "rows": rows, "cols": cols}
            process = await rt.agent.exec(
                argv,
                env={**rt.env, **variables},
                cwd=cwd or (None if user else rt.template.workdir),
                user=user,
                pty=PtySize(rows, cols),
            )
            try:
                await websocket.accept()
                await terminal.bridge(websocket, process)
            finally:
                await terminal.end(websocket, process)
        finally:
            end()

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
    async def read_file(sandbox_id: str, path: PathQuery, request: Request) -> StreamingResponse:
        rt, end = await begin_stream(request, sandbox_id)
        try:
            chunks = await rt.agent.read_file(path)
        except BaseException:
            end()
            raise

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()  # a client that left early: the guest closes the file now
                end()

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
    async def list_files(
        sandbox_id: str,
        path: PathQuery,
        limit: Annotated[
            int, Query(ge=1, le=MAX_LIST_ENTRIES, description="most entries to return")
        ] = MAX_LIST_ENTRIES,
    ) -> FileList:
        """A directory's entries by name; in a larger directory, `limit` of them (which ones is the
        guest's directory order) with `truncated: true`, so one listing's memory stays bounded."""
        async with manager.use(sandbox_id) as rt:
            entries, truncated = await rt.agent.list(path, limit)
        return FileList(
            entries=[_file_model(e) for e in sorted(entries, key=lambda e: e.name)], truncated=truncated
        )

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

    @app.get("/v1/openapi.json", include_in_schema=False)
    async def openapi_document() -> JSONResponse:
        """This API's OpenAPI document (committed as docs/openapi.json); needs a key like the rest."""
        return JSONResponse(app.openapi())

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
