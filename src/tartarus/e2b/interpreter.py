"""E2B's code interpreter (port 49999), as `e2b-code-interpreter` calls it, on Tartarus's warm interpreter.

`POST /execute` answers newline-delimited JSON, one message a line, as the SDK's `parse_output` reads
them: `stdout`/`stderr` (`text`, `timestamp` in ns), `result` (each format the value rendered to, and
`is_main_result`), `error` (`name`, `value`, `traceback`), `number_of_executions`, `end_of_execution`.
Contexts (`/contexts`) are the interpreter's separate notebooks (runtime/interpreter_main.py). Python
only; the cell runs to its end before its lines are sent (output is not streamed while it runs).
app.py has checked the sandbox's access or traffic token by the time a request gets here.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import fields
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tartarus.e2b.layer import upstream_of
from tartarus.e2b.upstream import UpstreamError
from tartarus.wire import CodeContext, Execution, Result

LANGUAGES = (None, "python", "python3")
CONTEXT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # as the interpreter's ids; /v1 checks the same
MAX_BODY = 2 << 20  # the /v1 code limit (1 MiB of code) plus room for JSON escaping and env vars


class Refused(Exception):
    """A request answered with an HTTP error, in the `{"code", "message"}` shape E2B's servers use."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> JSONResponse:
        return JSONResponse({"code": self.status, "message": self.message}, self.status)


def result_message(result: Result) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "result"}
    for f in fields(result):
        value = getattr(result, f.name)
        if f.name == "is_main_result" or value is not None:
            message[f.name] = value
    return message


def execution_lines(execution: Execution, timestamp_ns: int) -> bytes:
    """The NDJSON body of one `/execute`: what the SDK folds into its `Execution`."""
    messages: list[dict[str, Any]] = []
    for stream in ("stdout", "stderr"):
        text = getattr(execution, stream)
        if text:
            messages.append({"type": stream, "text": text, "timestamp": timestamp_ns})
    messages += [result_message(r) for r in execution.results]
    if execution.error is not None:
        e = execution.error
        messages.append({"type": "error", "name": e.name, "value": e.value, "traceback": e.traceback})
    if execution.execution_count is not None:
        messages.append({"type": "number_of_executions", "execution_count": execution.execution_count})
    messages.append({"type": "end_of_execution"})
    return b"".join(json.dumps(m, separators=(",", ":")).encode() + b"\n" for m in messages)


def context_body(context: CodeContext) -> dict[str, str]:
    return {"id": context.id, "language": context.language, "cwd": context.cwd}


async def _json(request: Request) -> dict[str, Any]:
    body = await request.body()
    if len(body) > MAX_BODY:
        raise Refused(413, f"the request body exceeds {MAX_BODY} bytes")
    try:
        value = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise Refused(400, f"the request is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise Refused(400, "the request must be a JSON object")
    return value


def _optional_text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise Refused(400, f"{name} must be a string")
    return value


def _language(body: dict[str, Any]) -> None:
    language = _optional_text(body, "language")
    if language not in LANGUAGES:
        raise Refused(400, f"language {language!r} is not supported: Tartarus's interpreter runs Python")


async def _refusal(request: Request, e: UpstreamError) -> Refused:
    """The daemon's refusal in E2B's terms: a gone sandbox is 502, as E2B's proxy answers (the SDK
    then says the sandbox timed out); a missing context 404 (its NotFoundException)."""
    sid: str = request.state.e2b_sandbox
    if e.status == 404:
        up = upstream_of(request)
        try:
            await up.get(up.key, sid)
        except UpstreamError:
            return Refused(502, f"The sandbox was not found: {sid}")
        return Refused(404, e.message)
    if e.status in (400, 413, 422):
        return Refused(400, e.message)
    if e.status in (401, 403):  # the token is not the daemon's, or opens no such call
        return Refused(e.status, e.message)
    if e.status == 409:
        return Refused(503, e.message)  # busy changing state (hibernating, waking)
    return Refused(e.status if e.status >= 500 else 500, e.message)


async def execute(request: Request) -> Response:
    body = await _json(request)
    code = body.get("code")
    if not isinstance(code, str):
        raise Refused(400, "code must be a string")
    _language(body)
    context = _optional_text(body, "context_id")
    if context is not None and not CONTEXT_ID.match(context):
        raise Refused(404, f"no context {context[:80]!r}")
    env = body.get("env_vars") or {}
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise Refused(400, "env_vars must be an object of strings")
    up = upstream_of(request)
    try:
        execution = await up.run_code(request.state.e2b_sandbox, code, context=context, env=env)
    except UpstreamError as e:
        raise await _refusal(request, e) from e
    return Response(execution_lines(execution, time.time_ns()), media_type="application/x-ndjson")


async def create_context(request: Request) -> Response:
    body = await _json(request)
    _language(body)
    cwd = _optional_text(body, "cwd")
    try:
        made = await upstream_of(request).create_context(request.state.e2b_sandbox, cwd)
    except UpstreamError as e:
        raise await _refusal(request, e) from e
    return JSONResponse(context_body(made))


async def list_contexts(request: Request) -> Response:
    try:
        listed = await upstream_of(request).contexts(request.state.e2b_sandbox)
    except UpstreamError as e:
        raise await _refusal(request, e) from e
    return JSONResponse([context_body(c) for c in listed])


async def restart_context(request: Request) -> Response:
    up = upstream_of(request)
    try:
        await up.restart_context(request.state.e2b_sandbox, _context_id(request))
    except UpstreamError as e:
        raise await _refusal(request, e) from e
    return Response(status_code=204)


async def delete_context(request: Request) -> Response:
    up = upstream_of(request)
    try:
        await up.delete_context(request.state.e2b_sandbox, _context_id(request))
    except UpstreamError as e:
        raise await _refusal(request, e) from e
    return Response(status_code=204)


async def health(request: Request) -> Response:
    up = upstream_of(request)
    try:
        await up.get(up.key, request.state.e2b_sandbox)
    except UpstreamError as e:
        raise await _refusal(request, e) from e
    return JSONResponse({"status": "ok"})


def _context_id(request: Request) -> str:
    context_id: str = request.path_params["context_id"]
    if not CONTEXT_ID.match(context_id):
        raise Refused(404, f"no context {context_id[:80]!r}")
    return context_id


def create_app() -> Starlette:
    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        return exc.response()

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/execute", execute, methods=["POST"]),
            Route("/contexts", create_context, methods=["POST"]),
            Route("/contexts", list_contexts, methods=["GET"]),
            Route("/contexts/{context_id}", delete_context, methods=["DELETE"]),
            Route("/contexts/{context_id}/restart", restart_context, methods=["POST"]),
        ],
        exception_handlers={Refused: refused},
    )
