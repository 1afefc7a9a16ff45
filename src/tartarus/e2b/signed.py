"""Signed file URLs (the SDK's `download_url` / `upload_url`): a `/files` request that carries no access
token may carry a signature instead, made by whoever holds the token, for one path, one operation and one
user, optionally until an expiry (E2B's v1: `v1_` + unpadded base64 of
sha256(`path:operation:user:token[:expiration]`)).

The token is the daemon's credential scoped to the sandbox, which this layer cannot make: the URL's
parameters go to the daemon as a signed credential (`wire.signed_file_credential`), which the daemon
checks (in constant time, never past its expiry) against the token it would mint, and which opens that
one sandbox's file reads or writes only. Without an expiry a signed URL lasts as long as the sandbox.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from tartarus.wire import signed_file_credential

FILES_PATH = "/files"
OPERATIONS = {"GET": "read", "POST": "write"}


def signed_credential(sandbox_id: str, method: str, path: str, query: bytes) -> str | None:
    """The credential a signed `/files` request presents (None: it is not one): GET reads, POST writes."""
    operation = OPERATIONS.get(method)
    if operation is None or path != FILES_PATH:
        return None
    params = parse_qs(query.decode("latin-1"), keep_blank_values=True)

    def one(name: str) -> str | None:
        values = params.get(name, [])
        return values[0] if len(values) == 1 else None

    signature = one("signature")
    if signature is None or "." in signature:
        return None
    expiration: int | None = None
    if "signature_expiration" in params:
        raw = one("signature_expiration")
        if raw is None or not raw.isdigit() or len(raw) > 12:
            return None
        expiration = int(raw)
    return signed_file_credential(
        sandbox_id, operation, one("path") or "", one("username") or "", expiration, signature
    )
