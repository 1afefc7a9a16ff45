"""Host side of the warm code interpreter (runtime/interpreter_main.py): `run_code` with state kept.

The interpreter is a long-lived exec whose stdin and stdout carry newline-delimited JSON. It is started
before a template is snapshotted, so a restored sandbox adopts it (same request id) rather than paying
for Python start-up and heavy imports.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tartarus.errors import InvalidArgument, NotFound, SandboxFailed, Timeout
from tartarus.runtime.agent import INTERPRETER_ID, AgentClient, Exit, Output, Process
from tartarus.wire import CodeContext, Execution, context_of, execution_of

GUEST_SCRIPT = Path(__file__).resolve().parent / "interpreter_main.py"
GUEST_PATH = "/opt/tartarus/interpreter.py"
MAX_LINE = 8 << 20
CONTROL_TIMEOUT = 60.0  # a context call waits at most for a running cell to end this long


class CodeInterpreter:
    """Talks to one guest interpreter; calls are serialised (one notebook kernel, one cell at a time)."""

    def __init__(
        self, process: Process, *, reseed_first: bool = False, first_id: int = 1, lenient: bool = False
    ) -> None:
        self._process = process
        self._buffer = bytearray()
        self._lock = asyncio.Lock()
        self._ids = itertools.count(first_id)
        self._reseed = reseed_first
        self._lenient = lenient  # skip lines that are not JSON (the tail of one a dead client half-read)

    @classmethod
    async def start(
        cls,
        agent: AgentClient,
        preload: list[str],
        timeout: float = 600.0,
        env: Mapping[str, str] | None = None,
    ) -> CodeInterpreter:
        """Install and start the interpreter; return once its heavy imports are done. `env` is there
        before the imports (a cap on BLAS threads is read when numpy loads)."""
        await agent.mkdir(str(Path(GUEST_PATH).parent), parents=True)
        await agent.write_file(GUEST_PATH, GUEST_SCRIPT.read_bytes())
        process = await agent.exec(
            ["python3", "-u", GUEST_PATH],
            env={**(env or {}), "TARTARUS_PRELOAD": ",".join(preload), "PYTHONDONTWRITEBYTECODE": "1"},
            cwd="/root",
            stdin=True,
            request_id=INTERPRETER_ID,
        )
        interpreter = cls(process)
        ready = await interpreter._read_message(timeout)
        if not ready.get("ready"):
            raise SandboxFailed(f"interpreter did not become ready: {ready}")
        return interpreter

    @classmethod
    def adopt(cls, agent: AgentClient, pid: int) -> CodeInterpreter:
        """The interpreter of a restored snapshot: its PRNG state is shared by every clone, so reseed."""
        return cls(agent.adopt(INTERPRETER_ID, pid), reseed_first=True)

    @classmethod
    def reattach(cls, agent: AgentClient, pid: int) -> CodeInterpreter:
        """The interpreter of a sandbox an earlier daemon ran: it may still answer that daemon's last
        call, so our ids start elsewhere and a torn line is skipped."""
        return cls(agent.adopt(INTERPRETER_ID, pid), first_id=1 + secrets.randbelow(1 << 40), lenient=True)

    async def set_env(self, env: Mapping[str, str]) -> None:
        """Put `env` in the running interpreter's `os.environ` (so also in what its code starts): it
        was started before the request that gave the env (at the template's snapshot)."""
        answer = await self.run_code(f"__import__('os').environ.update({dict(env)!r})")
        if answer.error is not None:
            raise InvalidArgument(f"env not accepted by the interpreter: {answer.error.value}")

    @property
    def pid(self) -> int:
        return self._process.pid

    async def run_code(
        self,
        code: str,
        timeout: float | None = None,
        *,
        context: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Execution:
        """Run a cell in `context` (the default notebook if None), with `env` set while it runs."""
        request: dict[str, Any] = {"code": code}
        if context is not None:
            request["context"] = context
        if env:
            request["env"] = dict(env)
        return execution_of(await self._call(request, timeout))

    async def create_context(self, cwd: str | None = None) -> CodeContext:
        return _context(
            (await self._call({"op": "create_context", "cwd": cwd}, CONTROL_TIMEOUT)).get("context")
        )

    async def contexts(self) -> list[CodeContext]:
        listed = (await self._call({"op": "list_contexts"}, CONTROL_TIMEOUT)).get("contexts")
        if not isinstance(listed, list):
            raise SandboxFailed("interpreter sent no context list")
        return [_context(c) for c in listed]

    async def restart_context(self, context_id: str) -> CodeContext:
        """Forget the context's globals (its working directory stays)."""
        request = {"op": "restart_context", "context": context_id}
        return _context((await self._call(request, CONTROL_TIMEOUT)).get("context"))

    async def delete_context(self, context_id: str) -> None:
        await self._call({"op": "delete_context", "context": context_id}, CONTROL_TIMEOUT)

    async def _call(self, request: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """One request and its answer; the interpreter's refusals raise NotFound / InvalidArgument."""
        async with self._lock:
            rid = next(self._ids)
            request = {"id": rid, **request}
            if self._reseed:
                request["reseed"] = True
                self._reseed = False
            await self._process.write_stdin(json.dumps(request).encode() + b"\n")
            while True:
                response = await self._read_message(timeout)
                if response.get("id") == rid:
                    break
        fault = response.get("fault")
        if isinstance(fault, dict):
            error = NotFound if fault.get("code") == "not_found" else InvalidArgument
            raise error(str(fault.get("message", "refused by the interpreter")))
        return response

    async def _read_message(self, timeout: float | None) -> dict[str, Any]:
        try:
            async with asyncio.timeout(timeout):
                while b"\n" not in self._buffer:
                    if len(self._buffer) > MAX_LINE:
                        raise SandboxFailed("interpreter sent an oversized message")
                    event = await self._process.next_event()
                    if isinstance(event, Output) and event.stream == "stdout":
                        self._buffer += event.data
                    elif isinstance(event, Exit):
                        raise SandboxFailed(f"the code interpreter exited ({event})")
        except StopAsyncIteration:
            raise SandboxFailed("the code interpreter's stream ended") from None
        except TimeoutError:
            # The interpreter may still be busy with this cell: interrupt it so the next call is served.
            await self._process.signal(2)
            raise Timeout(f"run_code did not finish within {timeout} s; interrupted") from None
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        try:
            message = json.loads(line)
        except ValueError:
            if self._lenient:
                return {}
            raise SandboxFailed(f"interpreter sent invalid JSON: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise SandboxFailed("interpreter sent a non-object message")
        return message


def _context(raw: object) -> CodeContext:
    try:
        return context_of(raw)
    except ValueError as e:
        raise SandboxFailed(f"the interpreter sent {e}") from None
