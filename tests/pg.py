"""A throwaway PostgreSQL server for tests: initdb + pg_ctl in a temp dir, unix socket only, trust auth."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found: run ./scripts/setup (apt: postgresql)")
    return found[-1].parent


def _as_postgres(argv: list[str]) -> list[str]:
    # initdb refuses to run as root: run the server as the postgres system user.
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a private cluster; yields a URL to its `postgres` database as superuser `postgres`."""
    bindir = _bindir()
    root = Path(tempfile.mkdtemp(prefix="tartarus-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    user = "postgres"
    try:
        subprocess.run(
            _as_postgres(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    user,
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ]
            ),
            check=True,
            capture_output=True,
        )
        options = f"-k {root} -c listen_addresses='' -F"
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
            yield f"postgresql:///postgres?host={root}&user={user}"
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
    return server_url.replace("postgresql:///postgres?", f"postgresql:///{name}?")
