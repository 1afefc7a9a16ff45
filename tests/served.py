"""`tartarus serve` as a real subprocess on a free TCP port: for tests that kill, restart or take over a
daemon (its VMMs outlive it by design, unlike the in-process daemons of the other tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import wait_until

TARTARUS = Path(sys.executable).parent / "tartarus"


class Served:
    """A daemon for `state`, with `args` for `serve`; `failpoints` arms TARTARUS_FAILPOINTS in it."""

    def __init__(
        self,
        state: Path,
        *args: str,
        database_url: str | None = None,
        pool_size: int = 0,
        failpoints: str = "",
    ) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "TARTARUS_STATE_DIR": str(state),
            "TARTARUS_POOL_SIZE": str(pool_size),
            "TARTARUS_FAILPOINTS": failpoints,
        }
        env.pop("TARTARUS_DATABASE_URL", None)
        if database_url:
            env["TARTARUS_DATABASE_URL"] = database_url
        self.log = (state.parent / f"daemon-{self.port}.log").open("w")
        self.proc = subprocess.Popen(
            [str(TARTARUS), "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        assert wait_until(self._up, timeout=60), "daemon did not come up"
        self.key = (state / "admin.key").read_text().strip()

    def _up(self) -> bool:
        assert self.proc.poll() is None, "daemon exited"
        try:
            return httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def pooled(self) -> int:
        return int(httpx.get(f"{self.url}/v1/health", timeout=5).json()["pooled"])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send `sig` if it still runs; its exit status (negative: the signal that ended it)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        self.log.close()
        return code
