"""Templates this daemon can create sandboxes from."""

from __future__ import annotations

from fastapi import APIRouter

from tartarus.daemon.models import TemplateInfo, TemplateList
from tartarus.templates.built import list_templates

router = APIRouter()


@router.get("/v1/templates", response_model=TemplateList)
async def templates() -> TemplateList:
    return TemplateList(
        templates=[
            TemplateInfo(name=t.name, key=t.key, fstype=t.fstype, vcpus=t.vcpus, memory_mib=t.memory_mib)
            for t in list_templates()
        ]
    )
