"""Result shapes both ends of the API share: the daemon builds them, the SDK hands them to users.

They live here, beside `errors`, rather than in `runtime/` or `sdk/`, because each side may import only
neutral modules of the other: the SDK imports no server code and the server never imports the SDK.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The display formats a rich result may carry, as Jupyter (and E2B) name them; png, jpeg and pdf are
# base64, json is the value itself, the others text.
RESULT_FORMATS = ("text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex", "json", "javascript")


@dataclass(frozen=True)
class ExecutionError:
    name: str
    value: str
    traceback: str


@dataclass(frozen=True)
class Result:
    """One thing a cell displayed, in every format the interpreter could render it in: the value of its
    last expression (`is_main_result`), or a figure or `display()` call along the way."""

    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    png: str | None = None
    jpeg: str | None = None
    pdf: str | None = None
    latex: str | None = None
    json: Any = None
    javascript: str | None = None
    is_main_result: bool = False

    def formats(self) -> list[str]:
        return [name for name in RESULT_FORMATS if getattr(self, name) is not None]


@dataclass(frozen=True)
class Execution:
    stdout: str
    stderr: str
    result: str | None  # repr() of the last expression's value
    error: ExecutionError | None
    results: tuple[Result, ...] = ()
    execution_count: int | None = None

    @property
    def text(self) -> str | None:
        """The main result's text (`"2"` for `1+1`), as E2B's `Execution.text`."""
        return next((r.text for r in self.results if r.is_main_result), self.result)


@dataclass(frozen=True)
class CodeContext:
    """A separate notebook in the sandbox's interpreter: its own globals and working directory."""

    id: str
    language: str
    cwd: str


# ---- lenient readers: the guest interpreter's answers, as the daemon and the E2B layer read them ----
def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def result_of(raw: object) -> Result:
    """One rich result as sent; what is not of its format's type is left out (the guest interpreter
    runs user code, so its messages are not trusted to be well formed)."""
    if not isinstance(raw, dict):
        return Result(text=repr(raw)[:200])
    fields: dict[str, Any] = {name: _text(raw.get(name)) for name in RESULT_FORMATS if name != "json"}
    json_value = raw.get("json")
    fields["json"] = json_value if isinstance(json_value, (dict, list)) else None
    return Result(**fields, is_main_result=raw.get("is_main_result") is True)


def execution_of(response: Mapping[str, Any]) -> Execution:
    error = response.get("error")
    results = response.get("results")
    count = response.get("execution_count")
    return Execution(
        stdout=str(response.get("stdout", "")),
        stderr=str(response.get("stderr", "")),
        result=_text(response.get("result")),
        error=None
        if not isinstance(error, dict)
        else ExecutionError(str(error.get("name")), str(error.get("value")), str(error.get("traceback", ""))),
        results=tuple(result_of(r) for r in results) if isinstance(results, list) else (),
        execution_count=count if isinstance(count, int) else None,
    )


def context_of(raw: object) -> CodeContext:
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str) for k in ("id", "language", "cwd")):
        raise ValueError(f"a malformed code context: {str(raw)[:200]}")
    return CodeContext(id=raw["id"], language=raw["language"], cwd=raw["cwd"])


@dataclass(frozen=True)
class SandboxMetrics:
    """What a running sandbox uses now: CPU (percent of its vCPUs since the previous reading, or since
    its VMM started), the guest's memory (its kernel's own view), and its writable layer's disk."""

    timestamp: float
    cpu_count: int
    cpu_used_pct: float
    mem_used_bytes: int
    mem_total_bytes: int
    mem_cache_bytes: int
    disk_used_bytes: int
    disk_total_bytes: int


# ---- sandbox-scoped credentials (daemon/scoped.py checks them; the E2B endpoint presents them) ----

SANDBOX_TOKEN = "tsbx"  # tsbx.{scope}.{sandbox}.{tenant}.{mac}
SIGNED_CREDENTIAL = "tsig"


def _b64url(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def signed_file_credential(
    sandbox_id: str, operation: str, path: str, user: str, expiration: int | None, signature: str
) -> str:
    """A signed file URL's parameters (E2B's: `operation` read or write, the path and user as signed,
    the expiry if any, the `v1_` signature) as the bearer credential the daemon checks."""
    exp = "" if expiration is None else str(expiration)
    parts = (SIGNED_CREDENTIAL, sandbox_id, operation, _b64url(path), _b64url(user), exp, signature)
    return ".".join(parts)
