"""Python SDK: `Sandbox` (sync) and `AsyncSandbox`, speaking the daemon's REST API."""

from tartarus.errors import (
    AuthError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Quarantined,
    QuotaExceeded,
    SandboxFailed,
    TartarusError,
    Timeout,
)
from tartarus.sdk._core import CommandResult
from tartarus.sdk.aio import AsyncClient, AsyncSandbox
from tartarus.sdk.results import CheckpointInfo, ExposedPort, FileInfo, FileList, SandboxInfo
from tartarus.sdk.sync import Client, Sandbox
from tartarus.sdk.terminal import AsyncPty, Pty
from tartarus.wire import Execution, ExecutionError

__all__ = [
    "AsyncClient",
    "AsyncPty",
    "AsyncSandbox",
    "AuthError",
    "CheckpointInfo",
    "Client",
    "CommandResult",
    "Execution",
    "ExecutionError",
    "ExposedPort",
    "FileInfo",
    "FileList",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Pty",
    "Quarantined",
    "QuotaExceeded",
    "Sandbox",
    "SandboxFailed",
    "SandboxInfo",
    "TartarusError",
    "Timeout",
]
