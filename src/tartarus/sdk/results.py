"""What the daemon answers, as frozen dataclasses: the one place the SDK turns its JSON into typed values,
for the sync and the async client alike.

Field names are the REST API's (docs/openapi.json). Each type reads only the fields it knows, so a newer
daemon's extra fields are ignored; a missing or mistyped field is a `TartarusError` naming it, not a
`KeyError` far from the call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tartarus import errors
from tartarus.wire import RESULT_FORMATS, Execution, ExecutionError, Result, SandboxMetrics


class Fields:
    """One JSON object of an answer, read field by field with each value's type checked."""

    def __init__(self, data: object, what: str) -> None:
        if not isinstance(data, dict):
            raise errors.TartarusError(f"the daemon's {what} is not a JSON object: {data!r:.200}")
        self._data: dict[object, object] = data
        self._what = what

    def _mistyped(self, key: str, value: object, kind: str) -> errors.TartarusError:
        return errors.TartarusError(f"the daemon's {self._what} has {key}={value!r:.100}, not {kind}")

    def _required(self, key: str) -> object:
        if key not in self._data:
            raise errors.TartarusError(f"the daemon's {self._what} has no {key!r}")
        return self._data[key]

    def _absent(self, key: str) -> bool:
        return self._data.get(key) is None

    def text(self, key: str) -> str:
        value = self._required(key)
        if isinstance(value, str):
            return value
        raise self._mistyped(key, value, "a string")

    def integer(self, key: str) -> int:
        value = self._required(key)
        if isinstance(value, int) and not isinstance(value, bool):  # JSON true is no number
            return value
        raise self._mistyped(key, value, "an integer")

    def number(self, key: str) -> float:
        value = self._required(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise self._mistyped(key, value, "a number")

    def optional_text(self, key: str) -> str | None:
        return None if self._absent(key) else self.text(key)

    def optional_integer(self, key: str) -> int | None:
        return None if self._absent(key) else self.integer(key)

    def optional_number(self, key: str) -> float | None:
        return None if self._absent(key) else self.number(key)

    def flag(self, key: str) -> bool:
        """A boolean the API defaults to false."""
        value = self._data.get(key, False)
        if isinstance(value, bool):
            return value
        raise self._mistyped(key, value, "true or false")

    def text_map(self, key: str) -> dict[str, str]:
        value = self._data.get(key) or {}
        if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            return dict(value)
        raise self._mistyped(key, value, "an object of strings")

    def number_map(self, key: str) -> dict[str, float]:
        value = self._data.get(key) or {}
        if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in value.items()
        ):
            return {k: float(v) for k, v in value.items()}
        raise self._mistyped(key, value, "an object of numbers")

    def optional_object(self, key: str) -> Fields | None:
        return None if self._absent(key) else Fields(self._data[key], f"{self._what}'s {key}")

    def items(self, key: str) -> list[object]:
        value = self._required(key)
        if isinstance(value, list):
            return list(value)
        raise self._mistyped(key, value, "a list")


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as the daemon described it: the answer to create, get, hibernate, wake, quarantine,
    release, set_timeout, and each entry of a listing."""

    id: str
    template: str
    state: str  # running | hibernated | failed | destroyed | lost
    created_at: float  # unix time
    vcpus: int
    memory_mib: int
    network: str = "none"  # egress in force now: none | allow | full
    restored: bool = False  # created by restoring the template's snapshot
    timings_ms: dict[str, float] = field(default_factory=dict)
    tenant: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    idle_timeout_s: float | None = None
    timeout: float | None = None  # seconds it was given when its timeout was set
    expires_at: float | None = None  # unix time it will be destroyed
    ended_at: float | None = None
    error: str | None = None
    quarantined: bool = False
    quarantine_reason: str | None = None
    disk_bytes: int | None = None  # while hibernated: its changes relative to its template, on disk
    backend: str | None = None  # what runs it: kvm | tcg (QEMU) | gvisor (runsc)

    @classmethod
    def from_json(cls, data: object) -> SandboxInfo:
        f = Fields(data, "sandbox")
        return cls(
            id=f.text("id"),
            template=f.text("template"),
            state=f.text("state"),
            created_at=f.number("created_at"),
            vcpus=f.integer("vcpus"),
            memory_mib=f.integer("memory_mib"),
            network=f.optional_text("network") or "none",
            restored=f.flag("restored"),
            timings_ms=f.number_map("timings_ms"),
            tenant=f.optional_text("tenant"),
            labels=f.text_map("labels"),
            idle_timeout_s=f.optional_number("idle_timeout_s"),
            timeout=f.optional_number("timeout"),
            expires_at=f.optional_number("expires_at"),
            ended_at=f.optional_number("ended_at"),
            error=f.optional_text("error"),
            quarantined=f.flag("quarantined"),
            quarantine_reason=f.optional_text("quarantine_reason"),
            disk_bytes=f.optional_integer("disk_bytes"),
            backend=f.optional_text("backend"),
        )

    @classmethod
    def list_from_json(cls, data: object) -> list[SandboxInfo]:
        """A `{"sandboxes": [...]}` answer (listing, fork)."""
        return [cls.from_json(item) for item in Fields(data, "sandbox list").items("sandboxes")]


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint of a running sandbox: `Sandbox.create(from_snapshot=checkpoint.id)` starts copies."""

    id: str
    sandbox_id: str  # the sandbox it was captured from
    template: str
    captured_at: float  # unix time
    disk_bytes: int  # memory state plus writable layer, as allocated on disk
    ttl_s: float | None = None  # seconds after its last use until gc deletes it

    @classmethod
    def from_json(cls, data: object) -> CheckpointInfo:
        f = Fields(data, "checkpoint")
        return cls(
            id=f.text("id"),
            sandbox_id=f.text("sandbox_id"),
            template=f.text("template"),
            captured_at=f.number("captured_at"),
            disk_bytes=f.integer("disk_bytes"),
            ttl_s=f.optional_number("ttl_s"),
        )

    @classmethod
    def list_from_json(cls, data: object) -> list[CheckpointInfo]:
        """A `{"checkpoints": [...]}` answer."""
        return [cls.from_json(item) for item in Fields(data, "checkpoint list").items("checkpoints")]


@dataclass(frozen=True)
class FileInfo:
    """One file in the guest (`files.stat`, and each entry of `files.list`)."""

    name: str
    type: str  # file | dir | symlink | other
    mode: int
    size: int
    mtime_ns: int
    uid: int
    gid: int
    link: str | None = None  # a symlink's target

    @classmethod
    def from_json(cls, data: object) -> FileInfo:
        f = Fields(data, "file info")
        return cls(
            name=f.text("name"),
            type=f.text("type"),
            mode=f.integer("mode"),
            size=f.integer("size"),
            mtime_ns=f.integer("mtime_ns"),
            uid=f.integer("uid"),
            gid=f.integer("gid"),
            link=f.optional_text("link"),
        )


@dataclass(frozen=True)
class ProcessInfo:
    """A command running in a sandbox (`commands.list`): `background` ones outlive their stream."""

    pid: int  # inside the guest
    argv: tuple[str, ...]
    cwd: str | None
    background: bool
    pty: bool
    stdin: bool  # its stdin is open (`commands.send_stdin`)
    attached: bool  # a stream follows its output

    @classmethod
    def from_json(cls, data: object) -> ProcessInfo:
        f = Fields(data, "process")
        argv = f.items("argv")
        if not all(isinstance(a, str) for a in argv):
            raise errors.TartarusError(f"the daemon's process has argv={argv!r:.100}, not strings")
        return cls(
            pid=f.integer("pid"),
            argv=tuple(str(a) for a in argv),
            cwd=f.optional_text("cwd"),
            background=f.flag("background"),
            pty=f.flag("pty"),
            stdin=f.flag("stdin"),
            attached=f.flag("attached"),
        )


@dataclass(frozen=True)
class WatchEvent:
    """A change in a watched directory (`files.watch`): `type` is create, write, remove, rename (moved
    away; its new name comes as a create), chmod, or overflow (changes were lost: look again); `name`
    is the path below the watched directory ("" for the directory itself, and for an overflow)."""

    type: str
    name: str
    is_dir: bool

    @classmethod
    def from_json(cls, data: object) -> WatchEvent:
        f = Fields(data, "watch event")
        return cls(type=f.text("type"), name=f.optional_text("name") or "", is_dir=f.flag("is_dir"))


def processes_from_json(data: object) -> tuple[ProcessInfo, ...]:
    return tuple(ProcessInfo.from_json(item) for item in Fields(data, "process list").items("processes"))


@dataclass(frozen=True)
class FileList:
    """A directory's entries by name; `truncated` when it holds more than the listing's limit."""

    entries: tuple[FileInfo, ...]
    truncated: bool = False

    @classmethod
    def from_json(cls, data: object) -> FileList:
        f = Fields(data, "file list")
        return cls(
            entries=tuple(FileInfo.from_json(item) for item in f.items("entries")),
            truncated=f.flag("truncated"),
        )


@dataclass(frozen=True)
class ExposedPort:
    """A guest port forwarded on the daemon's host: connect to `host:host_port`."""

    port: int
    host: str
    host_port: int
    traffic_token: str | None = None  # sent as X-Tartarus-Traffic-Token, if this port needs it

    @property
    def address(self) -> str:
        return f"{self.host}:{self.host_port}"

    @classmethod
    def from_json(cls, data: object) -> ExposedPort:
        f = Fields(data, "exposed port")
        return cls(
            port=f.integer("port"),
            host=f.text("host"),
            host_port=f.integer("host_port"),
            traffic_token=f.optional_text("traffic_token"),
        )


def metrics_from_json(data: object) -> SandboxMetrics:
    """A sandbox's metrics as `GET /v1/sandboxes/{id}/metrics` answers them."""
    f = Fields(data, "sandbox metrics")
    return SandboxMetrics(
        timestamp=f.number("timestamp"),
        cpu_count=f.integer("cpu_count"),
        cpu_used_pct=f.number("cpu_used_pct"),
        **{
            name: f.integer(name)
            for name in (
                "mem_used_bytes",
                "mem_total_bytes",
                "mem_cache_bytes",
                "disk_used_bytes",
                "disk_total_bytes",
            )
        },
    )


def result_from_json(data: object) -> Result:
    """One rich result of `run_code` (a value or figure, in each format it rendered to)."""
    f = Fields(data, "code result's result")
    raw = data if isinstance(data, dict) else {}
    json_value = raw.get("json")
    if json_value is not None and not isinstance(json_value, dict | list):
        raise f._mistyped("json", json_value, "an object or a list")
    texts = {name: f.optional_text(name) for name in RESULT_FORMATS if name != "json"}
    return Result(**texts, json=json_value, is_main_result=f.flag("is_main_result"))


def execution_from_json(data: object) -> Execution:
    """A `run_code` answer (its types live in `tartarus.wire`, shared with the daemon)."""
    f = Fields(data, "code result")
    e = f.optional_object("error")
    error = (
        None
        if e is None
        else ExecutionError(e.text("name"), e.text("value"), e.optional_text("traceback") or "")
    )
    results = f.items("results") if isinstance(data, dict) and "results" in data else []
    return Execution(
        stdout=f.text("stdout"),
        stderr=f.text("stderr"),
        result=f.optional_text("result"),
        error=error,
        results=tuple(result_from_json(r) for r in results),
        execution_count=f.optional_integer("execution_count"),
    )
