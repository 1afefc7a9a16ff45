"""`tartarus agent` and `tartarus gateway` as real subprocesses on free loopback ports (the agents are
not in network namespaces here: each has its own state dir and port)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import httpx

from tests.conftest import wait_until
from tests.served import TARTARUS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Role:
    """One `tartarus <role>` process; `url` is where it serves."""

    def __init__(
        self,
        root: Path,
        role: str,
        name: str,
        database_url: str,
        token: str,
        *args: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.state = root / name
        self.state.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "TARTARUS_STATE_DIR": str(self.state),
            "TARTARUS_POOL_SIZE": "0",
            "TARTARUS_DATABASE_URL": database_url,
            "TARTARUS_AGENT_TOKEN": token,
            **(env or {}),
        }
        extra = ["--name", name] if role == "agent" else []
        self.log_path = root / f"{name}.log"
        self.log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [str(TARTARUS), role, "--host", "127.0.0.1", "--port", str(self.port), *extra, *args],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        assert wait_until(self._up, timeout=90), f"{role} {name} did not come up: {self.log_path.read_text()}"

    def _up(self) -> bool:
        assert self.proc.poll() is None, f"{self.name} exited: {self.log_path.read_text()[-2000:]}"
        try:
            return httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=90)
        self.log.close()
        return code
