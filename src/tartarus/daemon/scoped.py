"""Sandbox-scoped credentials: what a client of one sandbox's insides (the E2B endpoint's data plane)
calls the daemon with instead of an API key, so that it reaches that one sandbox of that one tenant and
nothing else: no other sandbox, no control-plane call (create, list, delete, timeout, hibernate, ...).

A token is `tsbx.{scope}.{sandbox}.{tenant}.{mac}`, the mac an HMAC-SHA256 of the three under a secret
of this daemon (`<state>/sandbox-token.key`, 0600). It is minted for a caller whose key may touch the
sandbox (`POST /v1/sandboxes/{id}/tokens`) and stored nowhere: the same sandbox always gets the same
token (as E2B's `connect` hands out the same access token), a restarted daemon honours it, and it opens
nothing once its sandbox is gone (the tenant it names owns no sandbox of that id). Scopes:

- `data`: the sandbox's insides (exec, processes, terminals, files and watches, the code interpreter)
  and its own record (GET), which is how a data-plane client tells whether its sandbox still exists;
- `code`: the code interpreter only (E2B's traffic token).

A URL signed with a sandbox's `data` token (E2B's signed file URLs: `v1_` + unpadded base64 of
sha256(`path:operation:user:token[:expiration]`)) is presented as `tsig.{sandbox}.{operation}.{path}.
{user}.{expiration}.{signature}` (path and user base64url; `wire.signed_file_credential`): it is
checked here, against the token this daemon would mint, never after its expiry, and opens that
sandbox's file reads (`read`) or writes (`write`: upload, and the directories on its way) only. The
caller (the E2B layer) chooses the path of the call; the signature keeps it within the one sandbox its
token is for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from tartarus.private import opener
from tartarus.wire import SANDBOX_TOKEN as TOKEN
from tartarus.wire import SIGNED_CREDENTIAL as SIGNED

SECRET_FILE = "sandbox-token.key"
SCOPES = ("data", "code")
_PART = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # a sandbox id, a tenant, a scope, a mac (base64url)
_INSIDE = r"exec|processes(?:/.*)?|files(?:/.*)?|code(?:/.*)?|pty"
_SELF = re.compile(r"^/v1/sandboxes/(?P<id>[^/]+)$")
_CALL = re.compile(r"^/v1/sandboxes/(?P<id>[^/]+)/(?P<call>.+)$")
# What each kind of scoped credential opens in its own sandbox: (method or None for any, call pattern).
OPENS: dict[str, tuple[tuple[str | None, re.Pattern[str]], ...]] = {
    "data": ((None, re.compile(f"^(?:{_INSIDE})$")),),
    "code": ((None, re.compile(r"^code(?:/.*)?$")),),
    "read": (("GET", re.compile(r"^files$")),),
    "write": (("PUT", re.compile(r"^files$")), ("POST", re.compile(r"^files/mkdir$"))),
}


@dataclass(frozen=True)
class SandboxScope:
    """What a scoped credential opens: `kind` (data, code, read, write) of one sandbox."""

    sandbox_id: str
    kind: str

    def allows(self, method: str, path: str) -> bool:
        """Whether a request (`method`, `path`) stays inside this scope: its own sandbox's record (GET)
        or one of the calls its kind opens, on that sandbox. Anything else is another sandbox's, or the
        control plane's."""
        own = _SELF.match(path)
        if own is not None:
            return own["id"] == self.sandbox_id and method == "GET"
        call = _CALL.match(path)
        if call is None or call["id"] != self.sandbox_id:
            return False
        return any(
            (wanted is None or wanted == method) and pattern.match(call["call"])
            for wanted, pattern in OPENS[self.kind]
        )


@dataclass(frozen=True)
class Scoped:
    """A verified scoped credential: its scope and the tenant it acts for."""

    scope: SandboxScope
    tenant: str


def looks_scoped(secret: str) -> bool:
    return secret.startswith((TOKEN + ".", SIGNED + "."))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> str:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


def file_signature(path: str, operation: str, user: str, token: str, expiration: int | None) -> str:
    """E2B's v1 signature of a file URL, made with a sandbox's access token."""
    raw = f"{path}:{operation}:{user}:{token}" + (f":{expiration}" if expiration is not None else "")
    return "v1_" + base64.b64encode(hashlib.sha256(raw.encode()).digest()).rstrip(b"=").decode("ascii")


class SandboxTokens:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the sandbox token secret must be at least 32 bytes")
        self._secret = secret

    @classmethod
    def load(cls, state_dir: Path) -> SandboxTokens:
        """The daemon's secret from `state_dir`, made (0600, atomically) on first use."""
        path = state_dir / SECRET_FILE
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            pass
        tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}")
        with open(tmp, "wb", opener=opener) as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # never replaces a secret another process wrote meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return cls(path.read_bytes())

    def _mac(self, scope: str, sandbox_id: str, tenant: str) -> str:
        message = f"{scope}\0{sandbox_id}\0{tenant}".encode()
        return _b64(hmac.new(self._secret, message, hashlib.sha256).digest())

    def mint(self, scope: str, sandbox_id: str, tenant: str) -> str:
        if scope not in SCOPES:
            raise ValueError(f"no token scope {scope!r}")
        return ".".join((TOKEN, scope, sandbox_id, tenant, self._mac(scope, sandbox_id, tenant)))

    def verify(self, secret: str, owner: str | None, now: float | None = None) -> Scoped | None:
        """The scope `secret` opens, or None if it is no credential of this daemon's. `owner` is the
        tenant owning the sandbox a signed credential names (None: no such sandbox)."""
        parts = secret.split(".")
        if parts[0] == TOKEN and len(parts) == 5:
            _, scope, sandbox_id, tenant, mac = parts
            if scope not in SCOPES or not all(_PART.match(p) for p in parts[1:]):
                return None
            expected = self._mac(scope, sandbox_id, tenant)
            if not hmac.compare_digest(expected.encode(), mac.encode()):
                return None
            return Scoped(SandboxScope(sandbox_id, scope), tenant)
        if parts[0] == SIGNED and len(parts) == 7 and owner is not None:
            _, sandbox_id, operation, path, user, exp, signature = parts
            if operation not in ("read", "write") or not _PART.match(sandbox_id):
                return None
            expiration: int | None = None
            if exp:
                if not exp.isdigit() or len(exp) > 12:
                    return None
                expiration = int(exp)
                if expiration < (time.time() if now is None else now):
                    return None
            try:
                path_text, user_text = _unb64(path), _unb64(user)
            except (binascii.Error, UnicodeDecodeError):
                return None
            token = self.mint("data", sandbox_id, owner)
            expected = file_signature(path_text, operation, user_text, token, expiration)
            if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
                return None
            return Scoped(SandboxScope(sandbox_id, operation), owner)
        return None


def signed_sandbox(secret: str) -> str | None:
    """The sandbox a signed credential names (to look its owner up before verifying), or None."""
    parts = secret.split(".")
    return parts[1] if parts[0] == SIGNED and len(parts) == 7 else None
