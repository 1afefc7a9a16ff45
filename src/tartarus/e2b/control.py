"""E2B's control plane (api.e2b.app): sandboxes' lifecycle, each call one or two /v1 calls made with the
caller's own key, so the daemon decides who may do what.

Errors are E2B's `{"code": <status>, "message"}` with the status E2B uses, which is what makes the SDK
raise its own exceptions (404 → SandboxNotFoundException or kill() → False, 401 → AuthenticationException,
409 on pause → False).
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from tartarus.e2b.layer import Layer, layer_of
from tartarus.e2b.models import (
    ConnectSandbox,
    Error,
    ForkSandbox,
    ListedSandbox,
    NewSandbox,
    Sandbox,
    SandboxDetail,
    SandboxTimeout,
    rfc3339,
)
from tartarus.e2b.upstream import SandboxView, UpstreamError
from tartarus.wire import SandboxMetrics

E2B_STATES = {"running": "running", "hibernated": "paused"}  # the others have ended: E2B shows none
MAX_PAGE = 1000
FAR_END_S = 30 * 86400  # a sandbox without a timeout: reported to end this long after it started
DEFAULT_TIMEOUT_S = 300  # E2B's, when a create names none


class E2BError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> JSONResponse:
        return JSONResponse(Error(code=self.status, message=self.message).model_dump(), self.status)


def from_upstream(e: UpstreamError) -> E2BError:
    """The daemon's refusal in E2B's terms: the same status, except for the statuses E2B has none of."""
    status = {422: 400, 423: 409, 507: 503}.get(e.status, e.status)
    return E2BError(status, e.message)


E2B_FORM = re.compile(r"^e2b_(?P<hex>(?:[0-9a-f]{2})+)$")


def e2b_form(key: str) -> str:
    """A Tartarus key as E2B's SDKs up to 2.62 insist a key looks (`e2b_` then hex): its bytes in hex."""
    return "e2b_" + key.encode().hex()


def tartarus_key(key: str) -> str:
    """The Tartarus key a caller sent, in either form (`e2b_form`'s is decoded: it is no other key)."""
    match = E2B_FORM.match(key)
    if match is None:
        return key
    try:
        return bytes.fromhex(match["hex"]).decode("ascii")
    except UnicodeDecodeError:
        return key  # not a key in E2B's form: the daemon refuses it as it stands


def api_key(x_api_key: str | None, authorization: str | None) -> str:
    if x_api_key:
        return tartarus_key(x_api_key)
    if authorization and authorization.lower().startswith("bearer "):
        return tartarus_key(authorization[7:].strip())
    raise E2BError(401, "an API key is required: set E2B_API_KEY to a Tartarus key")


Key = Annotated[str | None, Header(alias="X-API-KEY")]
Authorization = Annotated[str | None, Header()]


def _e2b_state(view: SandboxView) -> str:
    state = E2B_STATES.get(view.state)
    if state is None:
        raise E2BError(404, f"sandbox {view.id} not found ({view.state})")
    return state


def listed_model(view: SandboxView) -> ListedSandbox:
    return ListedSandbox(
        template_id=view.template,
        sandbox_id=view.id,
        started_at=rfc3339(view.created_at),
        end_at=rfc3339(view.expires_at if view.expires_at else view.created_at + FAR_END_S),
        cpu_count=view.vcpus,
        memory_mb=view.memory_mib,
        metadata=dict(view.labels),
        state=_e2b_state(view),
    )


def listed(view: SandboxView) -> dict[str, Any]:
    return listed_model(view).model_dump(by_alias=True, exclude_none=True)


async def created(layer: Layer, key: str, view: SandboxView, alias: str | None) -> dict[str, Any]:
    """The create/connect answer; its tokens are the daemon's credentials scoped to the sandbox, minted
    with the caller's key (so only for a caller who may touch it)."""
    tokens = await layer.upstream.tokens(key, view.id)
    return Sandbox(
        template_id=view.template,
        sandbox_id=view.id,
        envd_access_token=tokens.data,
        traffic_access_token=tokens.code,
        alias=alias,
    ).model_dump(by_alias=True, exclude_none=True)


def parse_metadata(query: str | None) -> dict[str, str]:
    """The list filter as the SDK sends it: `urlencode({quote(k): quote(v)})` in one parameter."""
    if not query:
        return {}
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as e:
        raise E2BError(400, f"metadata must be key=value pairs: {e}") from e
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


def page_token(view: SandboxView) -> str:
    return base64.urlsafe_b64encode(f"{view.created_at!r}|{view.id}".encode()).decode()


def after_token(token: str) -> tuple[float, str]:
    try:
        created_at, sandbox_id = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
        return float(created_at), sandbox_id
    except (ValueError, binascii.Error, UnicodeDecodeError) as e:
        raise E2BError(400, "nextToken is not one this server gave") from e


def e2b_metrics(m: SandboxMetrics) -> dict[str, Any]:
    """/v1's metrics in E2B's shape (`SandboxMetric`)."""
    at = datetime.fromtimestamp(m.timestamp, UTC)
    return {
        "timestamp": at.isoformat().replace("+00:00", "Z"),
        "timestampUnix": int(at.timestamp()),
        "cpuCount": m.cpu_count,
        "cpuUsedPct": m.cpu_used_pct,
        "memUsed": m.mem_used_bytes,
        "memTotal": m.mem_total_bytes,
        "memCache": m.mem_cache_bytes,
        "diskUsed": m.disk_used_bytes,
        "diskTotal": m.disk_total_bytes,
    }


def router() -> APIRouter:
    api = APIRouter()

    async def create(request: Request, body: NewSandbox, key: str) -> JSONResponse:
        layer = layer_of(request)
        template = layer.template(body.template_id)
        spec: dict[str, Any] = {
            "template": template,
            "labels": body.metadata or {},
            "env": body.env_vars or {},
        }
        if body.auto_pause:
            # E2B pauses such a sandbox at its timeout instead of killing it; Tartarus hibernates one
            # after that many seconds without a call (and wakes it on the next call, as autoResume).
            spec["idle_timeout_s"] = body.timeout or DEFAULT_TIMEOUT_S
        elif body.timeout is not None:
            spec["timeout"] = body.timeout
        if body.allow_internet_access is not None:
            spec["network"] = {"mode": "full" if body.allow_internet_access else "none"}
        view = await layer.upstream.create(key, spec)
        alias = body.template_id if template != body.template_id else None
        return JSONResponse(await created(layer, key, view, alias), 201)

    @api.post("/v2/sandboxes", status_code=201)
    async def create_v2(
        request: Request, body: NewSandbox, x_api_key: Key = None, authorization: Authorization = None
    ) -> JSONResponse:
        return await create(request, body, api_key(x_api_key, authorization))

    @api.post("/sandboxes", status_code=201)
    async def create_v1(
        request: Request, body: NewSandbox, x_api_key: Key = None, authorization: Authorization = None
    ) -> JSONResponse:
        return await create(request, body, api_key(x_api_key, authorization))

    async def listing(
        request: Request,
        key: str,
        *,
        states: set[str],
        metadata: str | None,
        template: str | None = None,
        started_after: datetime | None = None,
        descending: bool = True,
    ) -> list[SandboxView]:
        views = await layer_of(request).upstream.list_sandboxes(key, parse_metadata(metadata))
        shown = [v for v in views if E2B_STATES.get(v.state) in states]
        if template:
            shown = [v for v in shown if v.template == template]
        if started_after:
            shown = [v for v in shown if v.created_at > started_after.timestamp()]
        return sorted(shown, key=lambda v: (v.created_at, v.id), reverse=descending)

    @api.get("/v2/sandboxes")
    async def list_v2(
        request: Request,
        x_api_key: Key = None,
        authorization: Authorization = None,
        metadata: str | None = None,
        state: Annotated[str | None, Query()] = None,
        template: str | None = None,
        started_after: Annotated[datetime | None, Query(alias="startedAfter")] = None,
        order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        next_token: Annotated[str | None, Query(alias="nextToken")] = None,
    ) -> Response:
        states = set((state or "running,paused").split(","))
        if not states <= {"running", "paused"}:
            raise E2BError(400, f"state must be running and/or paused, not {state!r}")
        descending = order == "desc"
        views = await listing(
            request,
            api_key(x_api_key, authorization),
            states=states,
            metadata=metadata,
            template=template,
            started_after=started_after,
            descending=descending,
        )
        if next_token:
            mark = after_token(next_token)
            views = [
                v
                for v in views
                if ((v.created_at, v.id) < mark if descending else (v.created_at, v.id) > mark)
            ]
        page, more = views[:limit], len(views) > limit
        headers = {"x-next-token": page_token(page[-1])} if more else {}
        return JSONResponse([listed(v) for v in page], headers=headers)

    @api.get("/sandboxes")
    async def list_v1(
        request: Request,
        x_api_key: Key = None,
        authorization: Authorization = None,
        metadata: str | None = None,
    ) -> JSONResponse:
        views = await listing(
            request, api_key(x_api_key, authorization), states={"running"}, metadata=metadata
        )
        return JSONResponse([listed(v) for v in views])

    @api.get("/sandboxes/{sandbox_id}")
    async def info(
        request: Request, sandbox_id: str, x_api_key: Key = None, authorization: Authorization = None
    ) -> JSONResponse:
        layer = layer_of(request)
        key = api_key(x_api_key, authorization)
        view = await layer.upstream.get(key, sandbox_id)
        tokens = await layer.upstream.tokens(key, view.id)
        detail = SandboxDetail(
            **listed_model(view).model_dump(), envd_access_token=tokens.data, traffic_access_token=tokens.code
        )
        return JSONResponse(detail.model_dump(by_alias=True, exclude_none=True))

    @api.get("/sandboxes/{sandbox_id}/metrics")
    async def metrics(
        request: Request, sandbox_id: str, x_api_key: Key = None, authorization: Authorization = None
    ) -> JSONResponse:
        """One entry, measured now (E2B keeps a series; `start`/`end` select from it, and the one
        entry is within any window that includes now). A paused sandbox has none."""
        now = await layer_of(request).upstream.metrics(api_key(x_api_key, authorization), sandbox_id)
        return JSONResponse([] if now is None else [e2b_metrics(now)])

    @api.delete("/sandboxes/{sandbox_id}", status_code=204)
    async def kill(
        request: Request, sandbox_id: str, x_api_key: Key = None, authorization: Authorization = None
    ) -> Response:
        await layer_of(request).upstream.delete(api_key(x_api_key, authorization), sandbox_id)
        return Response(status_code=204)

    @api.post("/sandboxes/{sandbox_id}/timeout", status_code=204)
    async def set_timeout(
        request: Request,
        sandbox_id: str,
        body: SandboxTimeout,
        x_api_key: Key = None,
        authorization: Authorization = None,
    ) -> Response:
        key = api_key(x_api_key, authorization)
        await layer_of(request).upstream.set_timeout(key, sandbox_id, max(body.timeout, 1))
        return Response(status_code=204)

    @api.post("/sandboxes/{sandbox_id}/pause", status_code=204)
    async def pause(
        request: Request, sandbox_id: str, x_api_key: Key = None, authorization: Authorization = None
    ) -> Response:
        key = api_key(x_api_key, authorization)
        upstream = layer_of(request).upstream
        if _e2b_state(await upstream.get(key, sandbox_id)) == "paused":
            raise E2BError(409, f"sandbox {sandbox_id} is already paused")
        await upstream.hibernate(key, sandbox_id)
        return Response(status_code=204)

    async def connect(request: Request, sandbox_id: str, timeout: int | None, key: str) -> JSONResponse:
        """Running: 200; paused: woken (Tartarus's wake restores memory and processes), 201."""
        layer = layer_of(request)
        view = await layer.upstream.get(key, sandbox_id)
        status = 200
        if _e2b_state(view) == "paused":
            view = await layer.upstream.wake(key, sandbox_id)
            status = 201
        if timeout is not None:
            view = await layer.upstream.set_timeout(key, sandbox_id, timeout)
        return JSONResponse(await created(layer, key, view, None), status)

    @api.post("/v2/sandboxes/{sandbox_id}/connect")
    async def connect_v2(
        request: Request,
        sandbox_id: str,
        body: ConnectSandbox,
        x_api_key: Key = None,
        authorization: Authorization = None,
    ) -> JSONResponse:
        return await connect(request, sandbox_id, body.timeout, api_key(x_api_key, authorization))

    @api.post("/sandboxes/{sandbox_id}/connect")
    async def connect_v1(
        request: Request,
        sandbox_id: str,
        body: ConnectSandbox,
        x_api_key: Key = None,
        authorization: Authorization = None,
    ) -> JSONResponse:
        return await connect(request, sandbox_id, body.timeout, api_key(x_api_key, authorization))

    @api.post("/sandboxes/{sandbox_id}/fork", status_code=201)
    async def fork(
        request: Request,
        sandbox_id: str,
        body: ForkSandbox,
        x_api_key: Key = None,
        authorization: Authorization = None,
    ) -> JSONResponse:
        """`count` running copies (memory, processes and files: Tartarus's fork), each with its own
        tokens and the timeout asked for (E2B's default if none)."""
        key = api_key(x_api_key, authorization)
        layer = layer_of(request)
        results = []
        for view in await layer.upstream.fork(key, sandbox_id, body.count):
            view = await layer.upstream.set_timeout(key, view.id, body.timeout or DEFAULT_TIMEOUT_S)
            results.append({"sandbox": await created(layer, key, view, None)})
        return JSONResponse(results, 201)

    @api.post("/sandboxes/{sandbox_id}/resume")
    async def resume(
        request: Request,
        sandbox_id: str,
        body: ConnectSandbox,
        x_api_key: Key = None,
        authorization: Authorization = None,
    ) -> JSONResponse:
        """Older SDKs' resume: only a paused sandbox (a running one is a 409, as E2B answers)."""
        key = api_key(x_api_key, authorization)
        if _e2b_state(await layer_of(request).upstream.get(key, sandbox_id)) == "running":
            raise E2BError(409, f"sandbox {sandbox_id} is already running")
        return await connect(request, sandbox_id, body.timeout, key)

    return api
