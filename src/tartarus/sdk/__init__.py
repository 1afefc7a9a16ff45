"""Python SDK: `Sandbox` (sync) and `AsyncSandbox`, speaking the daemon's REST API."""

from tartarus.errors import (
    AuthError,
    CaptureFailed,
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
from tartarus.sdk.aio import AsyncClient, AsyncCommandHandle, AsyncSandbox, AsyncWatcher
from tartarus.sdk.results import (
    CheckpointInfo,
    ExposedPort,
    FileInfo,
    FileList,
    ProcessInfo,
    SandboxInfo,
    WatchEvent,
)
from tartarus.sdk.sync import Client, CommandHandle, Sandbox, Watcher
from tartarus.sdk.terminal import AsyncPty, Pty
from tartarus.wire import CodeContext, Execution, ExecutionError, Result, SandboxMetrics

__all__ = [
    "AsyncClient",
    "AsyncCommandHandle",
    "AsyncPty",
    "AsyncSandbox",
    "AsyncWatcher",
    "AuthError",
    "CaptureFailed",
    "CheckpointInfo",
    "Client",
    "CodeContext",
    "CommandHandle",
    "CommandResult",
    "Execution",
    "ExecutionError",
    "ExposedPort",
    "FileInfo",
    "FileList",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ProcessInfo",
    "Pty",
    "Quarantined",
    "QuotaExceeded",
    "Result",
    "Sandbox",
    "SandboxFailed",
    "SandboxInfo",
    "SandboxMetrics",
    "TartarusError",
    "Timeout",
    "WatchEvent",
    "Watcher",
]
