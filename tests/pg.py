"""A throwaway PostgreSQL server for tests: initdb + pg_ctl in a temp dir, a unix socket with trust auth
(and TCP on a private test network, with a password, for agents in network namespaces)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def _bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found: run ./scripts/setup (apt: postgresql)")
    return found[-1].parent


def _as_postgres(argv: list[str]) -> list[str]:
    # initdb refuses to run as root: run the server as the postgres system user.
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@contextlib.contextmanager
def postgres_server(listen: str | None = None, network: str | None = None) -> Iterator[str]:
    """Start a private cluster; yields a URL to its `postgres` database as superuser `postgres`. On a unix
    socket only with trust; with `listen` (an address, e.g. a test bridge's), on TCP there too, where
    clients from `network` log in with a password (the URL carries it)."""
    bindir = _bindir()
    root = Path(tempfile.mkdtemp(prefix="tartarus-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    user = "postgres"
    password = secrets.token_hex(16)
    auth = ["--auth=trust"]
    if listen is not None:
        (root / "pw").write_text(password + "\n")
        if os.geteuid() == 0:
            shutil.chown(root / "pw", "postgres", "postgres")
        auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={root / 'pw'}"]
    try:
        subprocess.run(
            _as_postgres(
                [str(bindir / "initdb"), "-D", str(data), "-U", user, *auth, "--no-sync", "-E", "UTF8"]
            ),
            check=True,
            capture_output=True,
        )
        (root / "pw").unlink(missing_ok=True)
        options = f"-k {root} -c listen_addresses='' -F"
        url = f"postgresql:///postgres?host={root}&user={user}"
        if listen is not None:
            port = _free_port(listen)
            with open(data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {network or listen + '/32'} scram-sha-256\n")
            options = f"-k {root} -c listen_addresses={listen} -p {port} -F"
            url = f"postgresql://{user}:{password}@{listen}:{port}/postgres"
        subprocess.run(
            _as_postgres(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(root / "log"),
                    "-o",
                    options,
                    "-w",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=60,
        )
        try:
            yield url
        finally:
            subprocess.run(
                _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                capture_output=True,
                timeout=60,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def restart(server_url: str) -> None:
    """Restart the server behind `server_url` (fast shutdown: connected clients are dropped)."""
    root = Path(server_url.split("host=")[1].split("&")[0])
    subprocess.run(
        _as_postgres(
            [
                str(_bindir() / "pg_ctl"),
                "-D",
                str(root / "data"),
                "-l",
                str(root / "log"),
                "-m",
                "fast",
                "-w",
                "restart",
            ]
        ),
        check=True,
        capture_output=True,
        timeout=60,
    )


def fresh_database(server_url: str, name: str) -> str:
    """Create an empty database on the server; returns its URL."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    if server_url.startswith("postgresql:///"):  # on the unix socket (urlunsplit would drop the empty host)
        return server_url.replace("postgresql:///postgres?", f"postgresql:///{name}?")
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
