"""envd access tokens: what guards each sandbox's data plane on the E2B port.

A sandbox's token is HMAC-SHA256(node secret, sandbox id). Nothing per sandbox is stored, so the token
survives a daemon restart and every `connect` hands out the same one (as E2B does); the one secret lives
in a 0600 file of the state dir, never in a label or a log. A token opens only its own sandbox, and it
is given only to a caller whose API key may touch that sandbox (create, connect, info).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from tartarus.private import opener

SECRET_FILE = "e2b-token.key"
TRAFFIC = b"traffic\0"  # a sandbox id has no NUL: no id's envd token is another's traffic token


class TokenMint:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the token secret must be at least 32 bytes")
        self._secret = secret

    @classmethod
    def load(cls, state_dir: Path) -> TokenMint:
        """The node's secret from `state_dir`, made (0600, atomically) on first use."""
        path = state_dir / SECRET_FILE
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # the daemon may not have made it yet
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

    def token(self, sandbox_id: str) -> str:
        digest = hmac.new(self._secret, sandbox_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def traffic_token(self, sandbox_id: str) -> str:
        """E2B's traffic access token: what the code interpreter's SDK sends on the calls that carry no
        access token (its contexts). It opens the interpreter port only, never envd, and neither token
        can be derived from the other."""
        digest = hmac.new(self._secret, TRAFFIC + sandbox_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def check(self, sandbox_id: str, presented: str | None) -> bool:
        """Constant-time: how much of a wrong token matched leaks nothing."""
        return _same(self.token(sandbox_id), presented)

    def check_traffic(self, sandbox_id: str, presented: str | None) -> bool:
        return _same(self.traffic_token(sandbox_id), presented)


def _same(expected: str, presented: str | None) -> bool:
    if presented is None:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode("utf-8", "replace"))
