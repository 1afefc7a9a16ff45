"""A client of the OCI distribution API: manifests and blobs, read-only, over httpx.

Auth: anonymous first; on a 401 the `WWW-Authenticate` challenge says what to do — `Bearer` fetches a
token from the realm (with basic credentials if a docker config file has some), `Basic` resends with the
credentials. Transport failures, 5xx and 429 are retried with backoff; everything else is a typed
error at once. Every blob is hashed while it streams to disk and only renamed into place once its
size and digest check out. Plain HTTP is used for loopback registries or with `insecure=True`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tartarus.images.auth import Credentials, find_credentials, parse_challenge
from tartarus.images.errors import (
    DigestMismatch,
    ImageError,
    ImageNotFound,
    RegistryAuthError,
    RegistryError,
    TruncatedBlob,
)
from tartarus.images.manifest import ACCEPT, MAX_DOCUMENT_BYTES, Descriptor
from tartarus.images.reference import Reference, new_hasher

log = logging.getLogger(__name__)

ATTEMPTS = 4
BACKOFF_S = 0.25
CHUNK = 1 << 20
Progress = Callable[[int], None]


@dataclass(frozen=True)
class FetchedManifest:
    raw: bytes
    media_type: str
    digest: str  # computed from `raw`, never taken from a header


class _Retry(Exception):
    """A failure worth another attempt; `error` is raised if attempts run out."""

    def __init__(self, error: ImageError) -> None:
        super().__init__(error.message)
        self.error = error


def _registry_message(response: httpx.Response) -> str:
    """The `errors[].code: message` of a distribution-spec error body, if there is one."""
    try:
        errors = response.json().get("errors") or []
        return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors)
    except (ValueError, AttributeError, httpx.ResponseNotRead):
        return ""


class RegistryClient:
    """One registry; thread-safe (blobs download in parallel through one connection pool)."""

    def __init__(self, ref: Reference, *, insecure: bool = False, timeout: float = 60.0) -> None:
        self.ref = ref
        self.insecure = insecure
        scheme = "http" if insecure or ref.is_loopback else "https"
        self.base = f"{scheme}://{ref.api_host}/v2/{ref.repository}"
        self._credentials: Credentials | None = None
        self._credentials_loaded = False
        self._auth_header: str | None = None
        self._lock = threading.Lock()
        self.cancelled = threading.Event()  # set by close(): downloads in flight stop at their next chunk
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=10.0),
            follow_redirects=True,
            # http needs no TLS context; building one (with the CA bundle) costs ~20 ms of every pull.
            verify=scheme == "https",
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=8),
            headers={"User-Agent": "tartarus-images/1"},
        )

    def close(self) -> None:
        self.cancelled.set()
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- auth ----------------------------------------------------------------------------------

    def _creds(self) -> Credentials | None:
        if not self._credentials_loaded:
            self._credentials = find_credentials(self.ref.registry)
            self._credentials_loaded = True
        return self._credentials

    def _authenticate(self, response: httpx.Response, refused: bool) -> None:
        """React to a 401: get a token or use basic credentials; raise if that cannot help."""
        where = f"registry {self.ref.registry}"
        creds = self._creds()
        if refused:
            if creds is None:
                raise RegistryAuthError(
                    f"{where} requires credentials for {self.ref.repository} (none found)"
                )
            raise RegistryAuthError(f"{where} refused the credentials of {creds.username!r}")
        challenge = parse_challenge(response.headers.get("www-authenticate", ""))
        if challenge is None or challenge.scheme not in ("bearer", "basic"):
            raise RegistryAuthError(f"{where} answered 401 without a usable WWW-Authenticate challenge")
        if challenge.scheme == "basic":
            if creds is None:
                raise RegistryAuthError(f"{where} requires credentials (none found in the docker config)")
            self._auth_header = creds.basic_header()
            return
        realm = challenge.params.get("realm")
        if not realm:
            raise RegistryAuthError(f"{where}: bearer challenge without a realm")
        params = {"service": challenge.params.get("service", "")}
        params["scope"] = challenge.params.get("scope") or f"repository:{self.ref.repository}:pull"
        auth = httpx.BasicAuth(creds.username, creds.password) if creds else None
        try:
            token_response = self._http.get(realm, params=params, auth=auth)
        except httpx.HTTPError as e:
            raise RegistryError(f"{where}: token service {realm} unreachable: {e}") from e
        if token_response.status_code in (401, 403):
            who = f"the credentials of {creds.username!r}" if creds else "anonymous access"
            raise RegistryAuthError(f"{where}: token service refused {who}")
        if token_response.status_code != 200:
            raise RegistryError(f"{where}: token service answered {token_response.status_code}")
        try:
            body = token_response.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryAuthError(f"{where}: token service returned no token")
        self._auth_header = f"Bearer {token}"

    def _open(self, path: str, headers: dict[str, str], what: str) -> httpx.Response:
        """GET with auth and retries; returns an open streaming response whose status is 200."""
        url = f"{self.base}/{path}"
        refused = False
        for attempt in range(ATTEMPTS):
            sent = {**headers}
            with self._lock:
                if self._auth_header:
                    sent["Authorization"] = self._auth_header
            try:
                response = self._http.send(self._http.build_request("GET", url, headers=sent), stream=True)
            except httpx.TransportError as e:
                if attempt + 1 == ATTEMPTS:
                    raise RegistryError(f"{what}: {self.ref.registry} unreachable: {e}") from e
                log.info("%s: %s (attempt %d of %d); retrying", what, e, attempt + 1, ATTEMPTS)
                time.sleep(BACKOFF_S * 2**attempt)
                continue
            status = response.status_code
            if status == 200:
                return response
            try:
                response.read()
            except httpx.HTTPError:
                pass
            finally:
                response.close()
            if status == 401:
                with self._lock:
                    self._authenticate(response, refused or "Authorization" in sent)
                refused = True
                continue
            if status == 404:
                detail = _registry_message(response)
                raise ImageNotFound(
                    f"{what}: not found in {self.ref.registry}" + (f" ({detail})" if detail else "")
                )
            if status == 403:
                raise RegistryAuthError(f"{what}: access denied by {self.ref.registry}")
            if status != 429 and status < 500:
                detail = _registry_message(response)
                raise RegistryError(f"{what}: registry answered {status} {detail}".rstrip())
            if attempt + 1 == ATTEMPTS:
                raise RegistryError(f"{what}: registry answered {status} {ATTEMPTS} times")
            log.info(
                "%s: registry answered %d (attempt %d of %d); retrying", what, status, attempt + 1, ATTEMPTS
            )
            time.sleep(BACKOFF_S * 2**attempt)
        raise RegistryAuthError(f"{what}: registry {self.ref.registry} keeps asking for authentication")

    @contextmanager
    def _request(self, path: str, headers: dict[str, str], what: str) -> Iterator[httpx.Response]:
        response = self._open(path, headers, what)
        try:
            yield response
        finally:
            response.close()

    # ---- manifests and blobs -------------------------------------------------------------------

    def _small(self, path: str, headers: dict[str, str], what: str, limit: int) -> tuple[bytes, str]:
        """A document (manifest, index, config) in memory, with retries if the body is cut short."""
        for attempt in range(ATTEMPTS):
            try:
                with self._request(path, headers, what) as response:
                    data = bytearray()
                    for chunk in response.iter_bytes():
                        data += chunk
                        if len(data) > limit:
                            raise ImageError(f"{what}: larger than {limit} bytes")
                    return bytes(data), response.headers.get("content-type", "")
            except httpx.TransportError as e:
                if attempt + 1 == ATTEMPTS:
                    raise TruncatedBlob(f"{what}: transfer failed: {e}") from e
                log.info("%s: %s (attempt %d of %d); retrying", what, e, attempt + 1, ATTEMPTS)
                time.sleep(BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    def get_manifest(self, version: str) -> FetchedManifest:
        """A manifest or index by tag or digest; its digest is computed, and checked if pinned."""
        pinned = version.startswith(("sha256:", "sha512:"))
        what = f"{self.ref.registry}/{self.ref.repository}{'@' if pinned else ':'}{version}"
        data, media_type = self._small(f"manifests/{version}", {"Accept": ACCEPT}, what, MAX_DOCUMENT_BYTES)
        algorithm = version.partition(":")[0] if pinned else "sha256"
        digest = f"{algorithm}:{_hexdigest(algorithm, data)}"
        if pinned and digest != version:
            raise DigestMismatch(f"{what}: manifest hashes to {digest}, expected {version}")
        return FetchedManifest(data, media_type, digest)

    def get_blob_bytes(self, desc: Descriptor, what: str) -> bytes:
        """A small blob (an image config) in memory, verified."""
        if desc.size > MAX_DOCUMENT_BYTES:
            raise ImageError(f"{what}: {desc.size} bytes is too large for a config")
        try:
            data, _ = self._small(f"blobs/{desc.digest}", {}, what, desc.size)
        except ImageError as e:
            if "larger than" in e.message:
                raise DigestMismatch(f"{what}: longer than its declared {desc.size} bytes") from e
            raise
        check_blob(data, desc, what)
        return data

    def download_blob(
        self, desc: Descriptor, dest: Path, what: str, progress: Progress | None = None
    ) -> None:
        """Stream a blob to `dest` (via a temporary sibling), verifying size and digest on the way.

        A connection that drops mid-blob is retried from the start; a blob that keeps ending early is a
        `TruncatedBlob`, one that hashes wrong a `DigestMismatch` (not retried: the registry's copy is
        bad).
        """
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.part")
        last: ImageError | None = None
        try:
            for attempt in range(ATTEMPTS):
                written = 0
                hasher = new_hasher(desc.digest)
                try:
                    with self._request(f"blobs/{desc.digest}", {}, what) as response, tmp.open("wb") as out:
                        for chunk in response.iter_bytes(CHUNK):
                            if self.cancelled.is_set():
                                raise ImageError(f"{what}: download cancelled")
                            if written + len(chunk) > desc.size:
                                raise DigestMismatch(f"{what}: longer than its declared {desc.size} bytes")
                            out.write(chunk)
                            hasher.update(chunk)
                            written += len(chunk)
                            if progress:
                                progress(len(chunk))
                except httpx.TransportError as e:
                    last = TruncatedBlob(f"{what}: transfer failed after {written} of {desc.size} bytes: {e}")
                else:
                    if written == desc.size:
                        actual = f"{desc.digest.partition(':')[0]}:{hasher.hexdigest()}"
                        if actual != desc.digest:
                            raise DigestMismatch(
                                f"{what}: content hashes to {actual}, expected {desc.digest}"
                            )
                        os.replace(tmp, dest)
                        return
                    last = TruncatedBlob(f"{what}: ended after {written} of {desc.size} bytes")
                if progress and written:
                    progress(-written)
                if attempt + 1 < ATTEMPTS:
                    log.info("%s (attempt %d of %d); retrying", last.message, attempt + 1, ATTEMPTS)
                    time.sleep(BACKOFF_S * 2**attempt)
            assert last is not None
            raise last
        finally:
            tmp.unlink(missing_ok=True)


def _hexdigest(algorithm: str, data: bytes) -> str:
    return hashlib.new(algorithm, data).hexdigest()


def check_blob(data: bytes, desc: Descriptor, what: str) -> None:
    """Verify in-memory content against its descriptor: size, then digest."""
    if len(data) < desc.size:
        raise TruncatedBlob(f"{what}: ended after {len(data)} of {desc.size} bytes")
    if len(data) > desc.size:
        raise DigestMismatch(f"{what}: longer than its declared {desc.size} bytes")
    algorithm = desc.digest.partition(":")[0]
    actual = f"{algorithm}:{_hexdigest(algorithm, data)}"
    if actual != desc.digest:
        raise DigestMismatch(f"{what}: content hashes to {actual}, expected {desc.digest}")
