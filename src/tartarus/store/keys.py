"""API key material: high-entropy random secrets, stored only as their SHA-256.

A key carries 256 random bits, so a fast hash is enough (nothing to brute-force, unlike a password) and
lets every request be checked with one indexed lookup instead of a deliberately slow KDF.
"""

from __future__ import annotations

import hashlib
import re
import secrets

PREFIX = "tartarus_"
_SHAPE = re.compile(r"^tartarus_[A-Za-z0-9_-]{43}$")


def generate() -> tuple[str, str]:
    """A new (key id, secret key). The id names the key in listings; the secret is shown once."""
    return "key-" + secrets.token_hex(6), PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def well_formed(secret: str) -> bool:
    return bool(_SHAPE.match(secret))
