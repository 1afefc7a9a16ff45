"""Signed file URLs (the SDK's `download_url` / `upload_url`): a `/files` request that carries no access
token may carry a signature instead, made by whoever holds the token, for one path, one operation and one
user, optionally until an expiry.

The signature is E2B's v1: `v1_` + unpadded base64 of sha256(`path:operation:user:token[:expiration]`).
It is checked in constant time against the one the sandbox's own token makes; an expired one never
passes. Without an expiry a signed URL lasts as long as the sandbox's token (as on E2B).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import parse_qs

FILES_PATH = "/files"


def signature(path: str, operation: str, user: str, token: str, expiration: int | None) -> str:
    raw = f"{path}:{operation}:{user}:{token}" + (f":{expiration}" if expiration is not None else "")
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode("ascii")


def signed_file_request(method: str, path: str, query: bytes, token: str, now: float | None = None) -> bool:
    """Whether a request is a `/files` call that the sandbox's `token` signed: GET reads, POST writes."""
    operation = {"GET": "read", "POST": "write"}.get(method)
    if operation is None or path != FILES_PATH:
        return False
    params = parse_qs(query.decode("latin-1"), keep_blank_values=True)

    def one(name: str) -> str | None:
        values = params.get(name, [])
        return values[0] if len(values) == 1 else None

    presented = one("signature")
    if presented is None:
        return False
    expiration: int | None = None
    if "signature_expiration" in params:
        raw = one("signature_expiration")
        if raw is None or not raw.isdigit() or len(raw) > 12:
            return False
        expiration = int(raw)
        if expiration < (time.time() if now is None else now):
            return False
    expected = signature(one("path") or "", operation, one("username") or "", token, expiration)
    return hmac.compare_digest(expected.encode(), presented.encode("utf-8", "replace"))
