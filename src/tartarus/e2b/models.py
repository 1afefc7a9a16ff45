"""E2B's request and response shapes (its OpenAPI spec, as the pinned SDK reads and writes them).

Field names are E2B's on the wire (camelCase, and `allow_internet_access` as E2B spells it); fields the
SDK may send that Tartarus has no use for are accepted and ignored, as E2B's own API does.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# What the data plane implements, by envd's versioning (e2b/envd/versions.py): default user (0.4.0),
# octet-stream uploads (0.5.7). Not 0.6.2+ (file metadata as xattrs) nor watch features.
ENVD_VERSION = "0.5.7"
CLIENT_ID = "tartarus"


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class NewSandbox(Lenient):
    template_id: str = Field(alias="templateID", min_length=1, max_length=128)
    timeout: int | None = Field(None, ge=1, le=2592000)
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = Field(None, alias="envVars")
    allow_internet_access: bool | None = None
    auto_pause: bool | None = Field(None, alias="autoPause")


class ConnectSandbox(Lenient):
    timeout: int | None = Field(None, ge=1, le=2592000)


class ForkSandbox(Lenient):
    timeout: int | None = Field(None, ge=1, le=2592000)
    count: int = Field(1, ge=1, le=16)  # /v1's limit (E2B's SDK allows 20)


class SandboxTimeout(Lenient):
    timeout: int = Field(ge=0, le=2592000)


class Sandbox(BaseModel):
    """POST /v2/sandboxes and connect: where the SDK learns the access token."""

    model_config = ConfigDict(populate_by_name=True)

    template_id: str = Field(serialization_alias="templateID")
    sandbox_id: str = Field(serialization_alias="sandboxID")
    client_id: str = Field(CLIENT_ID, serialization_alias="clientID")
    envd_version: str = Field(ENVD_VERSION, serialization_alias="envdVersion")
    envd_access_token: str = Field(serialization_alias="envdAccessToken")
    # Sent by e2b-code-interpreter with its context calls, which carry no envd access token.
    traffic_access_token: str | None = Field(None, serialization_alias="trafficAccessToken")
    alias: str | None = None


class ListedSandbox(BaseModel):
    template_id: str = Field(serialization_alias="templateID")
    alias: str | None = None
    sandbox_id: str = Field(serialization_alias="sandboxID")
    client_id: str = Field(CLIENT_ID, serialization_alias="clientID")
    started_at: str = Field(serialization_alias="startedAt")
    end_at: str = Field(serialization_alias="endAt")
    cpu_count: int = Field(serialization_alias="cpuCount")
    memory_mb: int = Field(serialization_alias="memoryMB")
    # Tartarus's API does not report a running sandbox's disk size: 0 means "not reported".
    disk_size_mb: int = Field(0, serialization_alias="diskSizeMB")
    metadata: dict[str, str] = Field(default_factory=dict)
    state: Literal["running", "paused"]
    envd_version: str = Field(ENVD_VERSION, serialization_alias="envdVersion")


class SandboxDetail(ListedSandbox):
    envd_access_token: str = Field(serialization_alias="envdAccessToken")
    traffic_access_token: str | None = Field(None, serialization_alias="trafficAccessToken")


class Error(BaseModel):
    """E2B's control-plane error body; the SDK raises its own exception for the status."""

    code: int
    message: str
