"""Request and response bodies of the public REST API (/v1)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from tartarus.limits.spec import DEFAULT_DISK_MIB
from tartarus.network.policy import NetworkPolicy
from tartarus.runtime.protocol import PTY_MAX_SIZE
from tartarus.sandbox.backend import Backend
from tartarus.sandbox.spec import SandboxSpec
from tartarus.templates.spec import NAME_PATTERN

_ENV_KEY = r"^[A-Za-z_][A-Za-z0-9_]*$"
LABEL_KEY = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$"
MAX_TIMEOUT_S = 30 * 86400
Labels = dict[
    Annotated[str, StringConstraints(pattern=LABEL_KEY)], Annotated[str, StringConstraints(max_length=256)]
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_IDLE = Field(
    None, gt=0, le=7 * 86400, description="hibernate the sandbox after this many seconds without a call"
)


class CreateSandbox(Strict):
    template: str = Field(pattern=NAME_PATTERN, examples=["python-ds"])
    vcpus: int | None = Field(None, ge=1, le=16)
    memory_mib: int | None = Field(None, ge=128, le=65536)
    env: dict[str, str] = Field(default_factory=dict)
    idle_timeout_s: float | None = _IDLE
    network: NetworkPolicy = Field(
        default_factory=NetworkPolicy, description="egress: none (default), allow (listed), full (NAT)"
    )
    max_processes: int | None = Field(None, ge=20, le=1 << 22, description="tasks inside the guest")
    disk_mib: int | None = Field(
        None,
        ge=DEFAULT_DISK_MIB,
        le=1 << 20,
        description=f"writable disk in MiB (default and least {DEFAULT_DISK_MIB}); capped by the policy",
    )
    labels: Labels = Field(
        default_factory=dict,
        max_length=64,
        examples=[{"team": "ml"}],
        description="for list filters and policy rules",
    )
    timeout: float | None = Field(
        None,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="seconds until the sandbox is destroyed (none: never, or the policy's default); "
        "capped by the policy",
    )
    backend: Backend | None = Field(
        None,
        description="kvm or tcg (a QEMU microVM) or gvisor (runsc: native compute, a user-space kernel as "
        "its boundary); default: the template's, else the daemon's (TARTARUS_BACKEND), else the host's VM",
    )

    def spec(self, tenant: str) -> SandboxSpec:
        """The request as the layers below take it; `timeout` is capped by the policy at admission."""
        return SandboxSpec(
            template=self.template,
            vcpus=self.vcpus,
            memory_mib=self.memory_mib,
            env=self.env,
            network=self.network,
            labels=self.labels,
            tenant=tenant,
            ttl_s=self.timeout,
            idle_timeout=self.idle_timeout_s,
            disk_mib=self.disk_mib,
            max_processes=self.max_processes,
            backend=self.backend,
        )


class CreateFromCheckpoint(Strict):
    """A new sandbox from a checkpoint: its memory, processes and files, with its own identity."""

    env: dict[str, str] = Field(default_factory=dict)
    idle_timeout_s: float | None = _IDLE


class CreateCheckpoint(Strict):
    ttl_s: float | None = Field(
        None,
        gt=0,
        description="delete the checkpoint this long after its last use (default and cap: the policy's "
        "default_checkpoint_ttl_s, 7 days, and max_checkpoint_ttl_s, 30 days)",
    )


class ForkRequest(Strict):
    count: int = Field(1, ge=1, le=16)


class CheckpointInfo(BaseModel):
    id: str
    sandbox_id: str = Field(description="the sandbox it was captured from")
    template: str
    captured_at: float
    disk_bytes: int = Field(description="memory state plus writable layer, as allocated on disk")
    ttl_s: float | None = None


class CheckpointList(BaseModel):
    checkpoints: list[CheckpointInfo]


class GcResult(BaseModel):
    checkpoints: list[str] = Field(description="expired checkpoints deleted")
    pins: list[str] = Field(description="snapshot pins no image needed any more, deleted")
    namespaces: list[str] = Field(
        default_factory=list,
        description="sandbox network namespaces whose sandbox directory was gone, removed",
    )


class ExposeRequest(Strict):
    port: int = Field(ge=1, le=65535, description="a TCP port the guest listens on")
    secure: bool = Field(
        False,
        description="connections must present the sandbox's traffic token (header X-Tartarus-Traffic-Token "
        "or e2b-traffic-access-token) on their first HTTP/1.x request, else 403; an open port asked "
        "again with secure=true becomes protected",
    )


class ExposedPort(BaseModel):
    port: int
    host: str = Field(description="host address forwarding to the guest port")
    host_port: int
    traffic_token: str | None = Field(
        None, description="the sandbox's traffic token, if this port needs it (the same for all its ports)"
    )


class QuarantineRequest(Strict):
    reason: str = Field(min_length=1, max_length=1024)


class SetTimeout(Strict):
    timeout: float | None = Field(
        gt=0,
        le=MAX_TIMEOUT_S,
        description="seconds from now until the sandbox is destroyed, up to the policy's max_ttl_s "
        "(null, never, is refused: it is over any cap)",
    )


class SandboxInfo(BaseModel):
    id: str
    template: str
    state: Literal["running", "hibernated", "failed", "destroyed", "lost"]
    error: str | None = None
    created_at: float
    idle_timeout_s: float | None = None
    disk_bytes: int | None = Field(
        None, description="while hibernated: what it costs on disk (its changes relative to its template)"
    )
    vcpus: int
    memory_mib: int
    timings_ms: dict[str, float] = Field(default_factory=dict)
    restored: bool = Field(False, description="created by restoring the template's snapshot")
    backend: Backend | None = Field(
        None, description="what runs it: kvm, tcg (QEMU) or gvisor (runsc); none once it no longer runs"
    )
    network: Literal["none", "allow", "full"] = Field("none", description="egress in force now")
    quarantined: bool = False
    quarantine_reason: str | None = None
    tenant: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    timeout: float | None = Field(None, description="seconds the sandbox was given when its timeout was set")
    expires_at: float | None = Field(None, description="when the sandbox will be destroyed (unix time)")
    ended_at: float | None = None


class SandboxList(BaseModel):
    sandboxes: list[SandboxInfo]


class SandboxTokens(BaseModel):
    """Credentials scoped to one sandbox (`tartarus.daemon.scoped`), as `Authorization: Bearer`."""

    sandbox_id: str
    data: str = Field(description="opens the sandbox's insides (exec, processes, files, code) and its record")
    code: str = Field(description="opens its code interpreter only")


class TerminalSize(Strict):
    rows: int = Field(24, ge=1, le=PTY_MAX_SIZE)
    cols: int = Field(80, ge=1, le=PTY_MAX_SIZE)


class ExecRequest(Strict):
    argv: list[str] = Field(min_length=1, max_length=4096, examples=[["python3", "-c", "print(1)"]])
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = Field(None, pattern=r"^/")
    user: str | None = Field(None, pattern=r"^[a-z_][a-z0-9_-]*\$?$", max_length=32)
    timeout: float | None = Field(None, gt=0, le=86400, description="seconds; the command is killed after")
    stdin: str | None = Field(None, description="bytes for the command's stdin, base64-encoded")
    pty: TerminalSize | None = Field(
        None,
        description="run on a pseudo-terminal of this size (for programs that need a tty): stdout and"
        " stderr arrive merged as stdout, with the terminal's \\r\\n line ends; stdin, if given, is"
        " typed into it and followed by its EOF character (^D). For an interactive terminal use the"
        " WebSocket endpoint GET /v1/sandboxes/{id}/pty (docs/control-plane.md).",
    )


class ExecEvent(BaseModel):
    """One line of the exec stream (newline-delimited JSON)."""

    type: Literal["started", "stdout", "stderr", "exit", "error"]
    pid: int | None = None
    data: str | None = Field(None, description="base64 output bytes (stdout/stderr)")
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool | None = None
    code: str | None = None
    message: str | None = None
    errno: int | None = None


CONTEXT_ID = r"^[A-Za-z0-9_-]{1,64}$"


class RunCodeRequest(Strict):
    code: str = Field(max_length=1 << 20, examples=["df.describe()"])
    timeout: float | None = Field(None, gt=0, le=86400)
    context: str | None = Field(
        None, pattern=CONTEXT_ID, description="a context's id (POST .../code/contexts); default: 'default'"
    )
    env: dict[Annotated[str, StringConstraints(pattern=_ENV_KEY)], str] | None = Field(
        None, description="environment variables set while this code runs"
    )


class CodeError(BaseModel):
    name: str
    value: str
    traceback: str


class CodeResult(BaseModel):
    """One displayed value in each format it rendered to (png, jpeg and pdf base64)."""

    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    png: str | None = None
    jpeg: str | None = None
    pdf: str | None = None
    latex: str | None = None
    json_: dict[str, Any] | list[Any] | None = Field(None, alias="json")
    javascript: str | None = None
    is_main_result: bool = Field(False, description="the value of the code's last expression")

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class RunCodeResult(BaseModel):
    stdout: str
    stderr: str
    result: str | None = Field(None, description="repr() of the last expression's value")
    error: CodeError | None = None
    results: list[CodeResult] = Field(
        default_factory=list, description="the last expression's value and figures shown, rich formats"
    )
    execution_count: int | None = Field(None, description="cells run in this context so far")


class NewCodeContext(Strict):
    cwd: str | None = Field(None, max_length=4096, description="working directory (default: the template's)")
    language: Literal["python"] = "python"


class CodeContextModel(BaseModel):
    id: str
    language: str
    cwd: str


class CodeContextList(BaseModel):
    contexts: list[CodeContextModel]


class FileInfoModel(BaseModel):
    name: str
    type: Literal["file", "dir", "symlink", "other"]
    mode: int
    size: int
    mtime_ns: int
    uid: int
    gid: int
    link: str | None = None


class FileList(BaseModel):
    entries: list[FileInfoModel]
    truncated: bool = Field(False, description="the directory holds more entries than were listed")


class WriteResult(BaseModel):
    path: str
    size: int


class MkdirRequest(Strict):
    path: str = Field(pattern=r"^/")
    parents: bool = True


class RenameRequest(Strict):
    path: str = Field(pattern=r"^/")
    new_path: str = Field(pattern=r"^/")


class TemplateInfo(BaseModel):
    name: str
    key: str
    fstype: str
    vcpus: int
    memory_mib: int


class TemplateList(BaseModel):
    templates: list[TemplateInfo]


class ReadyCheck(BaseModel):
    name: str = Field(description="store, state_dir, guest or snapshot")
    ok: bool
    message: str = ""


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    accel: str | None
    sandboxes: int
    pooled: int
    ready: bool | None = Field(None, description="with ?ready=true: every readiness check passed")
    checks: list[ReadyCheck] | None = Field(None, description="with ?ready=true: each readiness check")


class ErrorDetail(BaseModel):
    code: str
    message: str
    errno: int | None = Field(None, description="Linux errno, for guest_error")
    checks: list[ReadyCheck] | None = Field(None, description="for not_ready: each readiness check")


class ErrorBody(BaseModel):
    error: ErrorDetail
