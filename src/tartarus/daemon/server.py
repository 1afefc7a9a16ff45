"""Run the API with uvicorn: as `tartarus serve`, or embedded in a thread for a one-shot `tartarus run`."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from tartarus.daemon.app import create_app
from tartarus.daemon.auth import write_key_file
from tartarus.daemon.config import DaemonConfig
from tartarus.errors import TartarusError
from tartarus.paths import LOCAL_KEY_FILE
from tartarus.private import make_private, opener

# How long a stopping daemon lets requests in flight finish before cancelling them (a cancelled create
# destroys what it made); only then do its sandboxes stop. Without it, one slow cold boot held the stop.
GRACE_S = 5
SOCKET_MODE = 0o600  # the API's unix socket: the daemon's user only (others use TCP, with a key)


def serve(
    state_dir: Path,
    *,
    host: str | None = None,
    port: int | None = None,
    uds: Path | None = None,
    keep_sandboxes: bool = False,
) -> None:
    # A served daemon's sandboxes outlive its crash, for the next one to take over (docs/control-plane.md).
    app = create_app(state_dir, DaemonConfig(live_restore=True, keep_on_stop=keep_sandboxes))
    # Logging is configured by the caller (JSON lines); the access log is ours, with request IDs.
    if uds is not None:
        uds.parent.mkdir(parents=True, exist_ok=True)
        uds.unlink(missing_ok=True)
        config = uvicorn.Config(app, timeout_graceful_shutdown=GRACE_S, log_config=None, access_log=False)
        UnixServer(config, uds).run()
        return
    config = uvicorn.Config(
        app,
        host=host or "127.0.0.1",
        port=port or 8700,
        timeout_graceful_shutdown=GRACE_S,
        log_config=None,
        access_log=False,
    )
    uvicorn.Server(config).run()


def private_socket(path: Path) -> socket.socket:
    """A unix socket bound at `path` with SOCKET_MODE. The mode is set on the socket before it is bound
    (Linux creates the file with it), so there is no moment when others may connect."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), SOCKET_MODE)
        sock.bind(str(path))
        os.chmod(path, SOCKET_MODE)
    except BaseException:
        sock.close()
        raise
    return sock


class UnixServer(uvicorn.Server):
    """uvicorn on a unix socket that only the daemon's user may connect to, at `path` once it serves.

    uvicorn's own `uds=` makes the socket 0666: any local user could send requests, and bodies. This
    one is bound 0600 under a temporary name beside `path` and renamed there after start-up, so a
    client that waits for the path finds a daemon ready (its admin key written), as with `uds=`."""

    def __init__(self, config: uvicorn.Config, path: Path) -> None:
        super().__init__(config)
        self.path = path
        self._staging = path.with_name(f".{secrets.token_hex(3)}")
        self.published = False  # `started` comes true a moment before the socket is at `path`

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        sock = private_socket(self._staging)
        try:
            super().run(sockets=[sock, *(sockets or [])])
        finally:
            sock.close()
            self._staging.unlink(missing_ok=True)  # start-up failed: nothing to find at `path`

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            os.replace(self._staging, self.path)
            self.published = True


def _reap_embedded(root: Path) -> None:
    """Remove per-process state dirs that embedded daemons of earlier versions left (`embedded/<pid>`)
    once their process is gone (their VMs died with them)."""
    if not root.exists():
        return
    for child in root.iterdir():
        with contextlib.suppress(ValueError):
            pid = int(child.name)
            if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
                from tartarus.sandbox.reap import reap_leftovers

                reap_leftovers(child / "sandboxes")
                shutil.rmtree(child, ignore_errors=True)


def _publish_local_key(state_dir: Path, uds: Path) -> Path | None:
    """Clients find a local daemon's admin key beside its socket (sdk/_core.py local_key): copy it there
    when the socket lives outside the state dir. Returns the copy, to remove when the daemon stops."""
    if uds.parent.resolve() == state_dir.resolve():
        return None
    copy = uds.parent / LOCAL_KEY_FILE
    write_key_file(copy, (state_dir / LOCAL_KEY_FILE).read_text().strip())
    return copy


@contextlib.contextmanager
def daemon_thread(
    state_dir: Path, uds: Path, daemon_config: DaemonConfig | None = None
) -> Iterator[uvicorn.Server]:
    """Serve the API for `state_dir` on `uds` from a thread of this process until the block ends."""
    app = create_app(state_dir, daemon_config)
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="on",
        access_log=False,
        timeout_graceful_shutdown=GRACE_S,
    )
    server = UnixServer(config, uds)
    thread = threading.Thread(target=server.run, name="tartarus-daemon", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.published:
            if not thread.is_alive():
                raise TartarusError("daemon failed to start (is another daemon using its state dir?)")
            if time.monotonic() > deadline:
                raise TartarusError("daemon did not start within 30 s")
            time.sleep(0.01)
        published = _publish_local_key(state_dir, uds)
        try:
            yield server
        finally:
            if published is not None:
                published.unlink(missing_ok=True)
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@contextlib.contextmanager
def _embedded_slot(root: Path) -> Iterator[Path]:
    """The first state dir `root/slot-N` no other embedded daemon holds, locked for the block.

    Slots outlive the command: the next run reuses the slot's node id and local admin key, so a shared
    database (TARTARUS_DATABASE_URL) gains no node and no key per `tartarus run`. Concurrent runs take
    different slots, so no two live daemons share a node id (each reconciles its node's sandboxes).
    """
    make_private(root)  # the slots are state dirs: the daemon's alone
    n = 0
    while True:
        lock = open(root / f"slot-{n}.lock", "a", opener=opener)  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            n += 1
            continue
        try:
            yield root / f"slot-{n}"
        finally:
            lock.close()
        return


@contextlib.contextmanager
def embedded_daemon(state_root: Path) -> Iterator[Path]:
    """A private daemon for one command (a reusable state dir, its own socket); yields its socket path."""
    embedded_root = state_root / "embedded"
    _reap_embedded(embedded_root)
    sock_dir = Path(tempfile.mkdtemp(prefix="tartarus-"))
    uds = sock_dir / "api.sock"
    try:
        # No pool: a one-shot command would pay to pre-start VMMs it never uses.
        with (
            _embedded_slot(embedded_root) as state_dir,
            daemon_thread(state_dir, uds, DaemonConfig(pool_size=0)),
        ):
            yield uds
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
