"""`tartarus serve --e2b-port P`: the E2B endpoint under uvicorn, from a thread beside the daemon.

It reaches the daemon the way any client does, over the daemon's socket (its unix socket, or TCP on
loopback), so it runs in a loop of its own and shares nothing with the daemon: it holds no key of its
own (control-plane calls carry the caller's, data-plane calls the sandbox-scoped credential the request
presented).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from tartarus.e2b.app import E2BApp
from tartarus.e2b.layer import Layer
from tartarus.e2b.upstream import Upstream
from tartarus.errors import TartarusError

GRACE_S = 5
LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True)
class Daemon:
    """Where the daemon listens: TCP `host`:`port`, or its unix socket `uds`."""

    state_dir: Path
    host: str | None = None
    port: int | None = None
    uds: Path | None = None

    def upstream(self) -> Upstream:
        if self.uds is not None:
            return Upstream(uds=self.uds)
        host = LOOPBACK.get(self.host or "", self.host or "127.0.0.1")
        host = f"[{host}]" if ":" in host else host
        return Upstream(url=f"http://{host}:{self.port}")


def create_app(daemon: Daemon) -> E2BApp:
    return E2BApp(lambda: Layer(upstream=daemon.upstream()))


@contextlib.contextmanager
def e2b_endpoint(daemon: Daemon, host: str, port: int) -> Iterator[uvicorn.Server]:
    """Serve the E2B endpoint on `host`:`port` until the block ends."""
    config = uvicorn.Config(
        create_app(daemon),
        host=host,
        port=port,
        log_config=None,
        access_log=False,  # data-plane URLs and headers are nobody's business; tokens never logged
        timeout_graceful_shutdown=GRACE_S,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="tartarus-e2b", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise TartarusError(f"the E2B endpoint could not listen on {host}:{port}")
            time.sleep(0.01)
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=GRACE_S + 5)
