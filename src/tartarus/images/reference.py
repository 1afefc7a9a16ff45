"""Image references (`[registry[:port]/]repo/path[:tag][@digest]`) and content digests.

Follows the grammar of the distribution project's `reference` package: the first component names a
registry only if it contains `.` or `:` or is `localhost`; otherwise the image is on Docker Hub, where
one-component names live under `library/`. Digests are validated strictly because their hex part
becomes a file name in the blob store.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from tartarus.images.errors import InvalidReference

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DOMAIN = re.compile(
    r"^(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*"
    r"[a-zA-Z0-9]))*|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?$"
)
_DIGEST_HEX = {"sha256": 64, "sha512": 128}


def parse_digest(value: str) -> str:
    """Validate `algorithm:hex` (sha256 or sha512, lowercase hex of the right length) and return it."""
    algorithm, sep, hex_ = value.partition(":")
    length = _DIGEST_HEX.get(algorithm)
    if not sep or length is None or len(hex_) != length or not re.fullmatch(r"[0-9a-f]+", hex_):
        raise InvalidReference(f"invalid digest {value!r} (expected sha256:<64 hex> or sha512:<128 hex>)")
    return value


def new_hasher(digest: str) -> hashlib._Hash:
    """A hash object of the digest's algorithm."""
    return hashlib.new(parse_digest(digest).partition(":")[0])


def digest_bytes(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port] as written, `docker.io` for Docker Hub
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def hostname(self) -> str:
        host = self.registry
        if host.startswith("["):
            return host[: host.index("]") + 1]
        return host.rsplit(":", 1)[0] if ":" in host else host

    @property
    def is_loopback(self) -> bool:
        return self.hostname in LOOPBACK_HOSTS or self.hostname.startswith("127.")

    @property
    def version(self) -> str:
        """What to ask the manifest endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_reference(text: str) -> Reference:
    """Parse an image reference; a missing tag (and digest) means `latest`."""
    original = text
    if not text or len(text) > 4096 or text != text.strip():
        raise InvalidReference(f"invalid image reference {original!r}")
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        parse_digest(digest)
    tag = None
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidReference(f"invalid tag {tag!r} in {original!r}")
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        if not _DOMAIN.match(first):
            raise InvalidReference(f"invalid registry {first!r} in {original!r}")
        registry, path = first, rest
    else:
        registry, path = DOCKER_HUB, text
        if "/" not in path:
            path = f"library/{path}"
    if not _PATH.match(path):
        raise InvalidReference(
            f"invalid repository name {path!r} in {original!r} (lowercase letters, digits, . _ - and /)"
        )
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, path, tag, digest)
