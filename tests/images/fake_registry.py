"""A small registry on 127.0.0.1 for what docker-registry cannot be made to do on demand: bearer-token
auth through a token service, 5xx answers and connections dropped in the middle of a blob."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

TOKEN = "tok-3f9a"


@dataclass
class Behaviour:
    user: str = "fake-user"
    password: str = "fake-pw"
    blob_errors: int = 0  # answer this many blob requests with 503 first
    blob_drops: int = 0  # then drop this many blob responses half-way
    token_requests: list[str] = field(default_factory=list)  # the basic user each token request carried
    blob_requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(layout: Path, behaviour: Behaviour, port: list[int]) -> type[BaseHTTPRequestHandler]:
    index = json.loads((layout / "index.json").read_text())
    tags = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in index["manifests"]}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            del format, args

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _challenge(self, repo: str) -> None:
            realm = f"http://127.0.0.1:{port[0]}/token"
            header = f'Bearer realm="{realm}",service="fake",scope="repository:{repo}:pull"'
            self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": header})

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path == "/token":
                auth = self.headers.get("Authorization", "")
                user, _, password = base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")
                with behaviour.lock:
                    behaviour.token_requests.append(user)
                if (user, password) != (behaviour.user, behaviour.password):
                    self._send(401, b"{}")
                    return
                assert parse_qs(url.query)["service"] == ["fake"]
                self._send(200, json.dumps({"token": TOKEN}).encode())
                return
            parts = url.path.split("/")  # /v2/<repo...>/<kind>/<ref>
            repo, kind, ref = "/".join(parts[2:-2]), parts[-2], parts[-1]
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._challenge(repo)
                return
            if kind == "manifests":
                desc = tags.get(ref) or next((m for m in tags.values() if m["digest"] == ref), None)
                digest = desc["digest"] if desc else ref
                path = layout / "blobs/sha256" / digest.partition(":")[2]
                if not path.is_file():
                    self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}')
                    return
                media_type = json.loads(path.read_bytes()).get("mediaType", "application/json")
                self._send(200, path.read_bytes(), {"Content-Type": media_type})
                return
            path = layout / "blobs/sha256" / ref.partition(":")[2]
            data = path.read_bytes()
            with behaviour.lock:
                behaviour.blob_requests += 1
                error = behaviour.blob_errors > 0
                behaviour.blob_errors -= int(error)
                drop = not error and behaviour.blob_drops > 0
                behaviour.blob_drops -= int(drop)
            if error:
                self._send(503, b"busy")
                return
            if drop:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self._send(200, data, {"Content-Type": "application/octet-stream"})

    return Handler


@contextmanager
def fake_registry(layout: Path, behaviour: Behaviour) -> Iterator[str]:
    """Serve `layout` (tags from its index.json); yields the registry address."""
    port: list[int] = [0]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(layout, behaviour, port))
    port[0] = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{port[0]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
