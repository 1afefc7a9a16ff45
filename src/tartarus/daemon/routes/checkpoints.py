"""Checkpoints: capture a running sandbox, list, inspect and delete captures, start sandboxes from one;
and the operators' clean-up of expired checkpoints and unused snapshot pins."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tartarus.daemon import quotas
from tartarus.daemon.auth import Principal
from tartarus.daemon.manager import SandboxManager
from tartarus.daemon.models import (
    CheckpointInfo,
    CheckpointList,
    CreateCheckpoint,
    CreateFromCheckpoint,
    GcResult,
    SandboxInfo,
)
from tartarus.daemon.routes.deps import ERRORS, AdminOnly, Caller, Control, Manager
from tartarus.daemon.routes.views import checkpoint_info, sandbox_info
from tartarus.daemon.table import SandboxRecord
from tartarus.errors import NotFound
from tartarus.sandbox.saved import SavedSandbox

router = APIRouter()


def _own_checkpoint(manager: SandboxManager, principal: Principal, checkpoint_id: str) -> SavedSandbox:
    """A checkpoint the caller may use: its tenant's (an admin's: any); others' answer 404."""
    saved = manager.get_checkpoint(checkpoint_id)
    if not principal.admin and saved.spec.tenant != principal.tenant:
        raise NotFound(f"no checkpoint {checkpoint_id!r}")
    return saved


@router.post(
    "/v1/sandboxes/{sandbox_id}/checkpoints",
    response_model=CheckpointInfo,
    status_code=201,
    responses=ERRORS,
)
async def create_checkpoint(
    sandbox_id: str, body: CreateCheckpoint, manager: Manager, control: Control
) -> CheckpointInfo:
    """Capture the running sandbox (it runs on) as a checkpoint new sandboxes can start from; its
    tenant's `max_checkpoints` quota counts it (429 quota_exceeded) until it is deleted or expires."""
    tenant = manager.get(sandbox_id).tenant  # the checkpoint's owner, as its record will say
    async with control.admitted(tenant, quotas.Usage(checkpoints=1)):
        saved = await manager.checkpoint(sandbox_id, body.ttl_s)
    return checkpoint_info(saved)


@router.get("/v1/checkpoints", response_model=CheckpointList)
async def list_checkpoints(caller: Caller, manager: Manager) -> CheckpointList:
    mine = [i for i in manager.checkpoints() if caller.admin or i.spec.tenant == caller.tenant]
    return CheckpointList(checkpoints=[checkpoint_info(i) for i in mine])


@router.get("/v1/checkpoints/{checkpoint_id}", response_model=CheckpointInfo, responses=ERRORS)
async def get_checkpoint(checkpoint_id: str, caller: Caller, manager: Manager) -> CheckpointInfo:
    return checkpoint_info(_own_checkpoint(manager, caller, checkpoint_id))


@router.delete("/v1/checkpoints/{checkpoint_id}", status_code=204, responses=ERRORS)
async def delete_checkpoint(checkpoint_id: str, caller: Caller, manager: Manager) -> Response:
    manager.delete_checkpoint(_own_checkpoint(manager, caller, checkpoint_id).id)
    return Response(status_code=204)


@router.post(
    "/v1/checkpoints/{checkpoint_id}/sandboxes",
    response_model=SandboxInfo,
    status_code=201,
    responses=ERRORS,
)
async def create_from_checkpoint(
    checkpoint_id: str,
    body: CreateFromCheckpoint,
    request: Request,
    caller: Caller,
    manager: Manager,
    control: Control,
) -> SandboxInfo:
    saved = _own_checkpoint(manager, caller, checkpoint_id)

    async def start() -> list[SandboxRecord]:
        return [await manager.create_from_checkpoint(saved.id, body.env, body.idle_timeout_s, caller.tenant)]

    (record,) = await control.new_sandboxes(request, quotas.Usage(1, saved.vcpus, saved.memory_mib), start)
    return sandbox_info(record)


@router.post("/v1/gc", response_model=GcResult, dependencies=AdminOnly)
async def gc(manager: Manager) -> GcResult:
    """Delete expired checkpoints and unused snapshot pins; remove network namespaces (and their
    uplinks and cgroups) whose sandbox directory is gone, whichever daemon on this host made them."""
    return GcResult(**manager.gc())
