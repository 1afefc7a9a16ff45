"""How the API shows what the daemon holds: sandboxes (live or ended) and checkpoints."""

from __future__ import annotations

from tartarus.daemon.models import CheckpointInfo, FileInfoModel, SandboxInfo
from tartarus.daemon.table import SandboxRecord
from tartarus.quarantine.info import containment_info
from tartarus.runtime.agent import FileInfo
from tartarus.sandbox.choice import vm_backend
from tartarus.sandbox.saved import SavedSandbox
from tartarus.store import SandboxRow


def sandbox_info(record: SandboxRecord, owner: bool = True) -> SandboxInfo:
    """A sandbox as the API shows it; `owner` adds who owns it and its lifetime (tenant, labels...)."""
    saved = record.saved
    extra = (
        {
            "tenant": record.tenant,
            "labels": dict(record.labels),
            "timeout": record.timeout_s,
            "expires_at": record.expires_at,
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
        disk_bytes=saved.disk_bytes if saved else None,
        vcpus=record.vcpus,
        memory_mib=record.memory_mib,
        timings_ms={k: round(v * 1000, 3) for k, v in record.timings.items()},
        restored="state_loaded" in record.timings,
        # A hibernated sandbox is a VM's capture (gVisor ones do not hibernate yet).
        backend=record.runtime.backend if record.runtime else vm_backend() if saved else None,
    )


def ended_info(row: SandboxRow) -> SandboxInfo:
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


def checkpoint_info(saved: SavedSandbox) -> CheckpointInfo:
    return CheckpointInfo(
        id=saved.id,
        sandbox_id=saved.sandbox_id,
        template=saved.template.name,
        captured_at=saved.captured_at,
        disk_bytes=saved.disk_bytes,
        ttl_s=saved.ttl_s,
    )


def file_info(info: FileInfo) -> FileInfoModel:
    return FileInfoModel(**info.__dict__)
