"""Signed file URLs: only the sandbox's token makes a signature that opens `/files`, for its one path,
operation and user, and never after its expiry."""

from __future__ import annotations

from urllib.parse import urlencode

from tartarus.e2b.signed import signature, signed_file_request

TOKEN = "token-of-the-sandbox"
NOW = 1_800_000_000.0


def query(**params: object) -> bytes:
    return urlencode({k: str(v) for k, v in params.items()}).encode()


def test_a_signature_opens_its_own_path_operation_and_user_only() -> None:
    sig = signature("/a", "read", "user", TOKEN, None)
    assert signed_file_request("GET", "/files", query(path="/a", username="user", signature=sig), TOKEN)
    assert not signed_file_request("POST", "/files", query(path="/a", username="user", signature=sig), TOKEN)
    assert not signed_file_request("GET", "/files", query(path="/b", username="user", signature=sig), TOKEN)
    assert not signed_file_request("GET", "/files", query(path="/a", username="root", signature=sig), TOKEN)
    assert not signed_file_request("GET", "/files", query(path="/a", username="user", signature=sig), "other")
    assert not signed_file_request("GET", "/health", query(path="/a", username="user", signature=sig), TOKEN)
    assert not signed_file_request("GET", "/files", query(path="/a", username="user"), TOKEN)
    write = signature("/a", "write", "", TOKEN, None)
    assert signed_file_request("POST", "/files", query(path="/a", signature=write), TOKEN)


def test_an_expired_or_tampered_expiry_never_passes() -> None:
    later = int(NOW) + 60
    sig = signature("/a", "read", "", TOKEN, later)
    ok = query(path="/a", signature=sig, signature_expiration=later)
    assert signed_file_request("GET", "/files", ok, TOKEN, now=NOW)
    assert not signed_file_request("GET", "/files", ok, TOKEN, now=later + 1)
    moved = query(path="/a", signature=sig, signature_expiration=later + 3600)
    assert not signed_file_request("GET", "/files", moved, TOKEN, now=NOW)
    dropped = query(path="/a", signature=sig)  # the expiry left out: a different signature
    assert not signed_file_request("GET", "/files", dropped, TOKEN, now=NOW)
    doubled = b"path=/a&signature=" + sig.encode() + b"&signature=" + sig.encode()
    assert not signed_file_request("GET", "/files", doubled, TOKEN, now=NOW)
