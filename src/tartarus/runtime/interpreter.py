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

from tartarus.errors import InvalidArgument, SandboxFailed, Timeout
from tartarus.runtime.agent import INTERPRETER_ID, AgentClient, Exit, Output, Process
from tartarus.wire import Execution, ExecutionError

GUEST_SCRIPT = Path(__file__).resolve().parent / "interpreter_main.py"
GUEST_PATH = "/opt/tartarus/interpreter.py"
MAX_LINE = 8 << 20


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
    async def start(cls, agent: AgentClient, preload: list[str], timeout: float = 600.0) -> CodeInterpreter:
        """Install and start the interpreter; return once its heavy imports are done."""
        await agent.mkdir(str(Path(GUEST_PATH).parent), parents=True)
        await agent.write_file(GUEST_PATH, GUEST_SCRIPT.read_bytes())
        process = await agent.exec(
            ["python3", "-u", GUEST_PATH],
            env={"TARTARUS_PRELOAD": ",".join(preload), "PYTHONDONTWRITEBYTECODE": "1"},
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

    async def run_code(self, code: str, timeout: float | None = None) -> Execution:
        async with self._lock:
            rid = next(self._ids)
            request: dict[str, Any] = {"id": rid, "code": code}
            if self._reseed:
                request["reseed"] = True
                self._reseed = False
            await self._process.write_stdin(json.dumps(request).encode() + b"\n")
            while True:
                response = await self._read_message(timeout)
                if response.get("id") == rid:
                    break
        error = response.get("error")
        return Execution(
            stdout=str(response.get("stdout", "")),
            stderr=str(response.get("stderr", "")),
            result=response.get("result"),
            error=None
            if error is None
            else ExecutionError(
                str(error.get("name")), str(error.get("value")), str(error.get("traceback", ""))
            ),
        )

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
