"""Sandbox-scoped credentials (daemon/scoped.py), the E2B endpoint's only way into a sandbox: a token
opens its one sandbox of its one tenant, within its scope, and nothing of the control plane; a signed
file URL (turned into a credential by e2b/signed.py) opens only its sandbox's file reads or writes, made
with that sandbox's token, for its path, operation and user, never after its expiry. The daemon refusing
them over HTTP is tests/api/test_scoped_tokens.py."""

from __future__ import annotations

import stat
from pathlib import Path
from urllib.parse import urlencode

from tartarus.daemon.scoped import SECRET_FILE, SandboxScope, SandboxTokens, file_signature
from tartarus.e2b.signed import signed_credential

NOW = 1_800_000_000.0
SECRET = b"s" * 32


def query(**params: object) -> bytes:
    return urlencode({k: str(v) for k, v in params.items()}).encode()


def test_tokens_are_per_sandbox_tenant_and_scope_stable_and_secret(tmp_path: Path) -> None:
    mint = SandboxTokens.load(tmp_path)
    assert stat.S_IMODE((tmp_path / SECRET_FILE).stat().st_mode) == 0o600
    token = mint.mint("data", "sb-1", "alice")
    assert SandboxTokens.load(tmp_path).mint("data", "sb-1", "alice") == token  # survives a restart
    verified = mint.verify(token, None)
    assert (
        verified is not None and verified.scope == SandboxScope("sb-1", "data") and verified.tenant == "alice"
    )
    forged = [
        token.replace("sb-1", "sb-2"),  # another sandbox, same mac
        token.replace("alice", "bob"),  # another tenant
        token.replace(".data.", ".code."),  # another scope
        token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
        token + ".x",
        "tsbx.data.sb-1.alice.",
    ]
    assert all(mint.verify(f, None) is None for f in forged)
    (tmp_path / "other").mkdir()
    assert SandboxTokens.load(tmp_path / "other").verify(token, None) is None  # another daemon's
    code = mint.mint("code", "sb-1", "alice")
    assert code != token and mint.verify(code, None) == mint.verify(code, "alice")


def test_a_scope_opens_its_own_sandboxs_insides_and_nothing_else() -> None:
    data = SandboxScope("sb-1", "data")
    for method, path in [
        ("GET", "/v1/sandboxes/sb-1"),
        ("POST", "/v1/sandboxes/sb-1/exec"),
        ("POST", "/v1/sandboxes/sb-1/processes"),
        ("POST", "/v1/sandboxes/sb-1/processes/7/stdin"),
        ("PUT", "/v1/sandboxes/sb-1/files"),
        ("GET", "/v1/sandboxes/sb-1/files/watch"),
        ("POST", "/v1/sandboxes/sb-1/code/contexts"),
        ("GET", "/v1/sandboxes/sb-1/pty"),
    ]:
        assert data.allows(method, path), (method, path)
    for method, path in [
        ("GET", "/v1/sandboxes/sb-2"),  # another sandbox
        ("POST", "/v1/sandboxes/sb-2/exec"),
        ("POST", "/v1/sandboxes/sb-10/exec"),
        ("DELETE", "/v1/sandboxes/sb-1"),  # the control plane, even of its own sandbox
        ("PUT", "/v1/sandboxes/sb-1/timeout"),
        ("POST", "/v1/sandboxes/sb-1/hibernate"),
        ("POST", "/v1/sandboxes/sb-1/fork"),
        ("POST", "/v1/sandboxes/sb-1/ports"),
        ("GET", "/v1/sandboxes/sb-1/metrics"),
        ("POST", "/v1/sandboxes/sb-1/tokens"),
        ("POST", "/v1/sandboxes/sb-1/checkpoints"),
        ("GET", "/v1/sandboxes"),
        ("POST", "/v1/sandboxes"),
        ("POST", "/v1/keys"),
        ("GET", "/v1/audit"),
        ("GET", "/v1/sandboxes/sb-1/exec/../../sb-2/exec"),
    ]:
        assert not data.allows(method, path), (method, path)
    code = SandboxScope("sb-1", "code")
    assert code.allows("POST", "/v1/sandboxes/sb-1/code") and code.allows("GET", "/v1/sandboxes/sb-1")
    assert not code.allows("POST", "/v1/sandboxes/sb-1/exec")
    assert not code.allows("GET", "/v1/sandboxes/sb-1/files")
    read = SandboxScope("sb-1", "read")
    assert read.allows("GET", "/v1/sandboxes/sb-1/files") and not read.allows(
        "PUT", "/v1/sandboxes/sb-1/files"
    )
    write = SandboxScope("sb-1", "write")
    assert write.allows("PUT", "/v1/sandboxes/sb-1/files")
    assert write.allows("POST", "/v1/sandboxes/sb-1/files/mkdir")
    assert not write.allows("GET", "/v1/sandboxes/sb-1/files")
    assert not write.allows("DELETE", "/v1/sandboxes/sb-1/files")


def signed(
    mint: SandboxTokens, method: str, sandbox: str, owner: str | None, now: float = NOW, **params: object
) -> SandboxScope | None:
    """What the daemon grants a signed `/files` request the E2B endpoint passed on."""
    credential = signed_credential(sandbox, method, "/files", query(**params))
    verified = None if credential is None else mint.verify(credential, owner, now=now)
    return None if verified is None else verified.scope


def test_a_signed_url_opens_its_sandboxs_file_calls_for_its_path_operation_and_user_only() -> None:
    mint = SandboxTokens(SECRET)
    token = mint.mint("data", "sb-1", "alice")
    sig = file_signature("/a", "read", "user", token, None)
    assert signed(mint, "GET", "sb-1", "alice", path="/a", username="user", signature=sig) == SandboxScope(
        "sb-1", "read"
    )
    assert signed(mint, "POST", "sb-1", "alice", path="/a", username="user", signature=sig) is None
    assert signed(mint, "GET", "sb-1", "alice", path="/b", username="user", signature=sig) is None
    assert signed(mint, "GET", "sb-1", "alice", path="/a", username="root", signature=sig) is None
    assert signed(mint, "GET", "sb-2", "alice", path="/a", username="user", signature=sig) is None
    assert signed(mint, "GET", "sb-1", "bob", path="/a", username="user", signature=sig) is None
    assert signed(mint, "GET", "sb-1", None, path="/a", username="user", signature=sig) is None  # gone
    assert signed(mint, "GET", "sb-1", "alice", path="/a", username="user") is None  # no signature
    assert signed_credential("sb-1", "GET", "/health", query(path="/a", signature=sig)) is None
    other = SandboxTokens(b"o" * 32)
    assert signed(other, "GET", "sb-1", "alice", path="/a", username="user", signature=sig) is None
    write = file_signature("/a", "write", "", token, None)
    assert signed(mint, "POST", "sb-1", "alice", path="/a", signature=write) == SandboxScope("sb-1", "write")


def test_an_expired_or_tampered_expiry_never_passes() -> None:
    mint = SandboxTokens(SECRET)
    token = mint.mint("data", "sb-1", "alice")
    later = int(NOW) + 60
    sig = file_signature("/a", "read", "", token, later)
    assert signed(mint, "GET", "sb-1", "alice", path="/a", signature=sig, signature_expiration=later)
    assert not signed(
        mint, "GET", "sb-1", "alice", later + 1, path="/a", signature=sig, signature_expiration=later
    )
    assert not signed(
        mint, "GET", "sb-1", "alice", path="/a", signature=sig, signature_expiration=later + 3600
    )
    assert not signed(mint, "GET", "sb-1", "alice", path="/a", signature=sig)  # the expiry left out
    doubled = b"path=/a&signature=" + sig.encode() + b"&signature=" + sig.encode()
    assert signed_credential("sb-1", "GET", "/files", doubled) is None
