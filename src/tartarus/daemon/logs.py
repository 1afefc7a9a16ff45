"""Structured logs: one JSON object per line, carrying the request ID of the API call being served."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import time
from typing import Any

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("tartarus_request_id", default=None)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# LogRecord attributes that are not user-supplied `extra` fields.
# (uvicorn adds `color_message`, an ANSI-coloured copy of the message.)
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


def new_request_id(offered: str | None) -> str:
    """The caller's X-Request-ID if it is a sane token (so traces join up), else a fresh one."""
    if offered and _REQUEST_ID.match(offered):
        return offered
    return secrets.token_hex(8)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            entry["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(fmt: str = "json", level: int = logging.INFO) -> None:
    """Route all logging (ours and uvicorn's) to stderr in `fmt` ("json" or "text")."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
