"""API keys, tenants with their quotas and usage, and the audit trail.

All but the tenant's own quota view need an admin key.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from tartarus.daemon.control import ControlPlane
from tartarus.daemon.models import ErrorBody
from tartarus.daemon.routes.deps import AdminOnly, Caller, Control
from tartarus.errors import NotFound
from tartarus.store.store import TENANT_PATTERN, ApiKey, Tenant

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody},
    401: {"model": ErrorBody},
    403: {"model": ErrorBody},
    404: {"model": ErrorBody},
}
TenantName = Annotated[str, Query(pattern=TENANT_PATTERN)]


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str = Field(pattern=TENANT_PATTERN, examples=["acme"])
    admin: bool = False
    description: str = Field("", max_length=200)


class KeyInfo(BaseModel):
    id: str
    tenant: str
    role: Literal["admin", "user"]
    description: str
    created_at: float
    revoked_at: float | None = None


class NewKey(KeyInfo):
    key: str = Field(description="the secret: shown only in this response, store it now")


class KeyList(BaseModel):
    keys: list[KeyInfo]


class Quota(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_sandboxes: int | None = Field(None, ge=0, le=1_000_000, description="None: unlimited")
    max_vcpus: int | None = Field(None, ge=0, le=1_000_000)
    max_memory_mib: int | None = Field(None, ge=0, le=1 << 30)
    max_checkpoints: int | None = Field(None, ge=0, le=1_000_000, description="checkpoints kept")


class TenantUsage(BaseModel):
    sandboxes: int
    vcpus: int  # of running sandboxes: a hibernated one's come back only if a wake is admitted
    memory_mib: int
    checkpoints: int


class TenantInfo(BaseModel):
    name: str
    created_at: float
    quota: Quota
    usage: TenantUsage


class TenantList(BaseModel):
    tenants: list[TenantInfo]


class AuditEntry(BaseModel):
    ts: float
    action: str
    tenant: str | None = None
    actor: str | None = None
    target: str | None = None
    status: int | None = None
    request_id: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


class AuditList(BaseModel):
    entries: list[AuditEntry]


def _key(key: ApiKey) -> KeyInfo:
    return KeyInfo(
        id=key.id,
        tenant=key.tenant,
        role="admin" if key.admin else "user",
        description=key.description,
        created_at=key.created_at,
        revoked_at=key.revoked_at,
    )


router = APIRouter(tags=["admin"])


def tenant_info(control: ControlPlane, tenant: Tenant) -> TenantInfo:
    used = control.usage(tenant.name)
    return TenantInfo(
        name=tenant.name,
        created_at=tenant.created_at,
        quota=Quota(
            max_sandboxes=tenant.max_sandboxes,
            max_vcpus=tenant.max_vcpus,
            max_memory_mib=tenant.max_memory_mib,
            max_checkpoints=tenant.max_checkpoints,
        ),
        usage=TenantUsage(
            sandboxes=used.sandboxes,
            vcpus=used.vcpus,
            memory_mib=used.memory_mib,
            checkpoints=control.checkpoints_of(tenant.name),
        ),
    )


@router.post("/v1/keys", response_model=NewKey, status_code=201, responses=_ERRORS, dependencies=AdminOnly)
async def create_key(body: CreateKey, request: Request, control: Control) -> NewKey:
    """Create an API key for a tenant (created if new). Admin only."""
    role = "admin" if body.admin else "user"
    key, secret = await control.db(
        control.store.create_key, body.tenant, role=role, description=body.description
    )
    request.state.audit_target = key.id
    request.state.audit_detail = {"key_tenant": key.tenant, "role": role}
    return NewKey(**_key(key).model_dump(), key=secret)


@router.get("/v1/keys", response_model=KeyList, responses=_ERRORS, dependencies=AdminOnly)
async def list_keys(control: Control, tenant: TenantName | None = None) -> KeyList:
    return KeyList(keys=[_key(k) for k in await control.db(control.store.list_keys, tenant)])


@router.delete("/v1/keys/{key_id}", status_code=204, responses=_ERRORS, dependencies=AdminOnly)
async def revoke_key(key_id: str, request: Request, control: Control) -> Response:
    """Revoke a key: it stops working at once. Admin only."""
    await control.db(control.store.revoke_key, key_id)
    request.state.audit_target = key_id
    return Response(status_code=204)


@router.get("/v1/tenants", response_model=TenantList, responses=_ERRORS, dependencies=AdminOnly)
async def list_tenants(control: Control) -> TenantList:
    return TenantList(tenants=[tenant_info(control, t) for t in await control.db(control.store.list_tenants)])


@router.get("/v1/tenants/{tenant}", response_model=TenantInfo, responses=_ERRORS)
async def get_tenant(tenant: str, caller: Caller, control: Control) -> TenantInfo:
    """A tenant's quota and usage: admins see any, a tenant key only its own."""
    found = await control.db(control.store.get_tenant, tenant)
    if found is None or not (caller.admin or caller.tenant == tenant):
        raise NotFound(f"no tenant {tenant!r}")
    return tenant_info(control, found)


@router.put(
    "/v1/tenants/{tenant}/quota", response_model=TenantInfo, responses=_ERRORS, dependencies=AdminOnly
)
async def set_quota(tenant: str, body: Quota, request: Request, control: Control) -> TenantInfo:
    """Set a tenant's limits (null: unlimited); applies to the next create, wake or checkpoint.
    Admin only."""
    updated = await control.db(
        control.store.set_quota,
        tenant,
        max_sandboxes=body.max_sandboxes,
        max_vcpus=body.max_vcpus,
        max_memory_mib=body.max_memory_mib,
        max_checkpoints=body.max_checkpoints,
    )
    request.state.audit_target = tenant
    request.state.audit_detail = body.model_dump()
    return tenant_info(control, updated)


@router.get("/v1/audit", response_model=AuditList, responses=_ERRORS, dependencies=AdminOnly)
async def audit_log(
    control: Control,
    tenant: TenantName | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> AuditList:
    """The newest audit entries first. Admin only."""
    rows = await control.db(control.store.list_audit, tenant=tenant, limit=limit)
    return AuditList(entries=[AuditEntry(**r) for r in rows])
