"""Sandbox-scoped credentials (`tartarus.daemon.scoped`): minted for a caller whose key may touch the
sandbox, for a client that must reach that sandbox's insides and nothing else (the E2B endpoint)."""

from __future__ import annotations

from fastapi import APIRouter

from tartarus.daemon.models import SandboxTokens
from tartarus.daemon.routes.deps import ERRORS, Control, Manager

router = APIRouter()


@router.post("/v1/sandboxes/{sandbox_id}/tokens", response_model=SandboxTokens, responses=ERRORS)
async def sandbox_tokens(sandbox_id: str, manager: Manager, control: Control) -> SandboxTokens:
    """The sandbox's scoped tokens, for its owning tenant: the same on every call, valid until the
    sandbox is gone. A scoped token cannot mint (this is not among what it opens)."""
    owner = manager.get(sandbox_id).tenant
    mint = control.sandbox_tokens
    return SandboxTokens(
        sandbox_id=sandbox_id,
        data=mint.mint("data", sandbox_id, owner),
        code=mint.mint("code", sandbox_id, owner),
    )
