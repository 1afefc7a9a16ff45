"""Sandboxes: create, list, inspect, time out, delete; hibernate and wake; fork; exposed ports;
quarantine and release (operators only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from tartarus.daemon import quotas
from tartarus.daemon.auth import Principal
from tartarus.daemon.control import parse_labels
from tartarus.daemon.models import (
    CreateSandbox,
    ExposedPort,
    ExposeRequest,
    ForkRequest,
    QuarantineRequest,
    SandboxInfo,
    SandboxList,
    SetTimeout,
)
from tartarus.daemon.routes.deps import ERRORS, AdminOnly, Caller, Control, Manager
from tartarus.daemon.routes.views import ended_info, sandbox_info
from tartarus.errors import Conflict
from tartarus.sandbox import usage
from tartarus.wire import SandboxMetrics

router = APIRouter()


def _operator(principal: Principal) -> str:
    """Who a quarantine or release is recorded as done by: the admin key, and its tenant."""
    return f"operator:{principal.key_id}@{principal.tenant}"


@router.post("/v1/sandboxes", response_model=SandboxInfo, status_code=201, responses=ERRORS)
async def create_sandbox(
    body: CreateSandbox, request: Request, caller: Caller, manager: Manager, control: Control
) -> SandboxInfo:
    """Create a sandbox owned by the caller's tenant, within its quota (429 quota_exceeded) and the
    host's policy (403 policy_denied, or admitted into quarantine)."""
    return sandbox_info(await control.create(request, body.spec(caller.tenant)))


@router.get("/v1/sandboxes", response_model=SandboxList, responses=ERRORS)
async def list_sandboxes(
    caller: Caller,
    manager: Manager,
    control: Control,
    label: Annotated[list[str], Query(description="key=value; repeat to require several")] = [],  # noqa: B006
    tenant: Annotated[str | None, Query(description="admins: only this tenant's")] = None,
    include_ended: Annotated[bool, Query(description="also destroyed, failed and lost ones")] = False,
) -> SandboxList:
    """The caller's sandboxes (an admin's: everyone's), optionally filtered by labels."""
    labels = parse_labels(label)
    shown = control.visible(caller, manager.list(), labels=labels, tenant=tenant)
    sandboxes = [sandbox_info(r) for r in shown]
    if include_ended:
        live = {s.id for s in sandboxes}
        ended = await control.ended(caller, labels=labels, tenant=tenant)
        sandboxes += [ended_info(row) for row in ended if row.id not in live]
    return SandboxList(sandboxes=sandboxes)


@router.get("/v1/sandboxes/{sandbox_id}", response_model=SandboxInfo, responses=ERRORS)
async def get_sandbox(sandbox_id: str, manager: Manager, control: Control) -> SandboxInfo:
    return sandbox_info(manager.get(sandbox_id))


@router.get("/v1/sandboxes/{sandbox_id}/metrics", response_model=SandboxMetrics, responses=ERRORS)
async def sandbox_metrics(sandbox_id: str, manager: Manager) -> SandboxMetrics:
    """Measured now, never from a cache; a hibernated sandbox is not woken to be measured (409)."""
    sandbox = manager.get(sandbox_id).runtime
    if sandbox is None:
        raise Conflict(f"sandbox {sandbox_id} is not running: it uses no CPU or memory now")
    return await usage.measure(sandbox)


@router.put("/v1/sandboxes/{sandbox_id}/timeout", response_model=SandboxInfo, responses=ERRORS)
async def set_timeout(sandbox_id: str, body: SetTimeout, manager: Manager, control: Control) -> SandboxInfo:
    """Destroy the sandbox `timeout` seconds from now (null: keep it until deleted)."""
    await control.set_timeout(sandbox_id, body.timeout)
    return sandbox_info(manager.get(sandbox_id))


@router.delete("/v1/sandboxes/{sandbox_id}", status_code=204, responses=ERRORS)
async def delete_sandbox(sandbox_id: str, manager: Manager) -> Response:
    await manager.destroy(sandbox_id)
    return Response(status_code=204)


@router.post("/v1/sandboxes/{sandbox_id}/hibernate", response_model=SandboxInfo, responses=ERRORS)
async def hibernate(sandbox_id: str, manager: Manager, control: Control) -> SandboxInfo:
    """Put the sandbox to disk: no process, no RAM; any later call wakes it as it was."""
    return sandbox_info(await manager.hibernate(sandbox_id))


@router.post("/v1/sandboxes/{sandbox_id}/wake", response_model=SandboxInfo, responses=ERRORS)
async def wake(sandbox_id: str, manager: Manager, control: Control) -> SandboxInfo:
    return sandbox_info(await manager.wake(sandbox_id))


@router.post("/v1/sandboxes/{sandbox_id}/fork", response_model=SandboxList, status_code=201, responses=ERRORS)
async def fork(
    sandbox_id: str, body: ForkRequest, request: Request, caller: Caller, manager: Manager, control: Control
) -> SandboxList:
    """Running copies of the sandbox, owned by the caller's tenant and counted against its quota."""
    source, n = manager.get(sandbox_id), body.count
    wanted = quotas.Usage(n, n * source.vcpus, n * source.memory_mib)
    copies = await control.new_sandboxes(request, wanted, lambda: manager.fork(sandbox_id, n, caller.tenant))
    return SandboxList(sandboxes=[sandbox_info(r) for r in copies])


@router.post("/v1/sandboxes/{sandbox_id}/ports", response_model=ExposedPort, responses=ERRORS)
async def expose_port(sandbox_id: str, body: ExposeRequest, manager: Manager) -> ExposedPort:
    """A host address forwarding TCP to a port of the guest (the guest still cannot connect out);
    with `secure`, only for connections that present the traffic token. 429 quota_exceeded past the
    policy's bounds on exposed ports per sandbox and per tenant."""
    e = await manager.expose(sandbox_id, body.port, body.secure)
    return ExposedPort(port=e.guest_port, host=e.host, host_port=e.host_port, traffic_token=e.token)


@router.delete("/v1/sandboxes/{sandbox_id}/ports/{port}", status_code=204, responses=ERRORS)
async def unexpose_port(sandbox_id: str, port: int, manager: Manager) -> Response:
    """Stop forwarding a guest port (its connections end), freeing its place in the bounds."""
    await manager.unexpose(sandbox_id, port)
    return Response(status_code=204)


@router.post(
    "/v1/sandboxes/{sandbox_id}/quarantine",
    response_model=SandboxInfo,
    responses=ERRORS,
    dependencies=AdminOnly,
)
async def quarantine_sandbox(
    sandbox_id: str, body: QuarantineRequest, caller: Caller, manager: Manager
) -> SandboxInfo:
    """Operator action (admin key): cut the sandbox's network now and clamp its CPU and memory."""
    return sandbox_info(await manager.quarantine(sandbox_id, body.reason, by=_operator(caller)), owner=False)


@router.post(
    "/v1/sandboxes/{sandbox_id}/release",
    response_model=SandboxInfo,
    responses=ERRORS,
    dependencies=AdminOnly,
)
async def release_sandbox(sandbox_id: str, caller: Caller, manager: Manager) -> SandboxInfo:
    """Operator action (admin key): end a quarantine; the requested network and limits come back.
    A tenant cannot lift a verdict on its own sandbox."""
    return sandbox_info(await manager.release(sandbox_id, by=_operator(caller)), owner=False)
