"""Registry credentials from docker-style config files, and `WWW-Authenticate` challenge parsing.

Looked up, first match wins: `$REGISTRY_AUTH_FILE` (podman/skopeo), `$DOCKER_CONFIG/config.json`, then
`~/.docker/config.json`. Only inline credentials (`auth` or `username`/`password`) are read; credential
helpers (`credsStore`, `credHelpers`) would mean running arbitrary binaries and are not supported.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tartarus.images.reference import DOCKER_HUB

log = logging.getLogger(__name__)

_HUB_ALIASES = {DOCKER_HUB, "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never print a password
        return f"Credentials(username={self.username!r}, password=***)"

    def basic_header(self) -> str:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"


def config_files() -> list[Path]:
    files: list[Path] = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("DOCKER_CONFIG"):
        files.append(Path(os.environ["DOCKER_CONFIG"]) / "config.json")
    files.append(Path.home() / ".docker" / "config.json")
    return files


def _host_key(key: str) -> str:
    """`https://index.docker.io/v1/` → `index.docker.io`; `127.0.0.1:5000` stays."""
    key = re.sub(r"^[a-z]+://", "", key.strip())
    return key.split("/", 1)[0].lower()


def _matches(key: str, registry: str) -> bool:
    host = _host_key(key)
    registry = registry.lower()
    if registry in _HUB_ALIASES:
        return host in _HUB_ALIASES
    return host == registry


def _decode(entry: dict[str, object], source: Path) -> Credentials | None:
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, sep, password = base64.b64decode(auth).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            log.warning("ignoring malformed `auth` entry in %s", source)
            return None
        return Credentials(user, password) if sep else None
    username, secret = entry.get("username"), entry.get("password")
    if isinstance(username, str) and isinstance(secret, str):
        return Credentials(username, secret)
    return None


def find_credentials(registry: str) -> Credentials | None:
    """Credentials for `registry` (host[:port]) from the first config file that has some."""
    for path in config_files():
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable registry credentials file %s: %s", path, e)
            continue
        auths = data.get("auths") if isinstance(data, dict) else None
        if not isinstance(auths, dict):
            continue
        for key, entry in auths.items():
            if isinstance(entry, dict) and _matches(str(key), registry):
                creds = _decode(entry, path)
                if creds is not None:
                    return creds
    return None


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "bearer" or "basic", lowercase
    params: dict[str, str]


_PARAM = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


def parse_challenge(header: str) -> Challenge | None:
    """`Bearer realm="https://auth/token",service="reg",scope="repository:x:pull"` → Challenge."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM.finditer(rest)
    }
    return Challenge(scheme.lower(), params)
