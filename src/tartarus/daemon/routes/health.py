"""What operators and load balancers ask the daemon itself: health and readiness, metrics, the API's
OpenAPI document."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import tartarus
from tartarus.daemon import readiness
from tartarus.daemon.models import ErrorBody, Health, ReadyCheck
from tartarus.daemon.routes.deps import AdminOnly, Control, Manager
from tartarus.errors import NotReady, TartarusError

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorBody} for status in (400, 401, 403, 404)}


@router.get(
    "/v1/health",
    response_model=Health,
    response_model_exclude_none=True,
    responses={503: {"model": ErrorBody, "description": "not ready (with ready=true)"}},
    openapi_extra={"security": []},
)
async def health(
    manager: Manager,
    control: Control,
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
        found = await readiness.check(manager.state_dir, control.ping)
        failed = [c for c in found if not c.ok]
        if failed:
            message = "not ready: " + "; ".join(f"{c.name}: {c.message}" for c in failed)
            raise NotReady(message, [c.__dict__ for c in found])
        checks = [ReadyCheck(name=c.name, ok=c.ok, message=c.message) for c in found]

    accel = None
    with contextlib.suppress(TartarusError):
        from tartarus.bootfiles.kernel import kernel_path

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


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **_ERRORS},
    tags=["admin"],
    dependencies=AdminOnly,
)
async def metrics(control: Control) -> Response:
    """Prometheus metrics (see docs/metrics.md). Admin only: they count every tenant's sandboxes."""
    return Response(generate_latest(control.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/openapi.json", include_in_schema=False)
async def openapi_document(request: Request) -> JSONResponse:
    """This API's OpenAPI document (committed as docs/openapi.json); needs a key like the rest."""
    return JSONResponse(request.app.openapi())
