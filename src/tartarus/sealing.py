"""Env values at rest: sealed with AES-GCM under a key of the daemon's own (`<state>/env.key`).

A sandbox's create-time env (API tokens, passwords) must outlive the request: every exec, a restarted
daemon's takeover and a wake apply it again. So it is written down, in `sandbox.json` and in hibernation
and checkpoint records, but sealed: a copy of a record (a backup, a support bundle, a file read through
some other hole) does not show it. The sandbox id is the associated data, so a sealed env moved into
another sandbox's record does not open. The key file is as private as the state dir itself: whoever can
read it (root, the daemon's user) can open the records, and could read guest memory anyway.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_FILE = "env.key"
PREFIX = "aesgcm1:"  # a sealed env is this string; a record from before sealing has a plain object
NONCE_BYTES = 12


class SealError(ValueError):
    """A sealed env that does not open: another daemon's key, a lost key file, or a tampered record."""


class EnvSeal:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    @classmethod
    def for_state_dir(cls, state_dir: Path) -> EnvSeal:
        """The daemon's key: the one in `<state>/env.key`, or a new one written there first."""
        return cls(_load_or_create_key(state_dir / KEY_FILE))

    def seal(self, env: Mapping[str, str], sandbox_id: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        plain = json.dumps(dict(env), sort_keys=True).encode()
        sealed = self._aead.encrypt(nonce, plain, sandbox_id.encode())
        return PREFIX + base64.b64encode(nonce + sealed).decode()

    def open(self, value: object, sandbox_id: str) -> dict[str, str]:
        """The env `value` holds: sealed by `seal`, or a plain object (written before envs were sealed)."""
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        if not isinstance(value, str) or not value.startswith(PREFIX):
            raise SealError(f"sandbox {sandbox_id}: the env is neither sealed nor a plain object")
        try:
            raw = base64.b64decode(value[len(PREFIX) :], validate=True)
            plain = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], sandbox_id.encode())
        except (ValueError, InvalidTag):
            raise SealError(
                f"sandbox {sandbox_id}: its env does not open with this daemon's key ({KEY_FILE})"
            ) from None
        env = json.loads(plain)
        return {str(k): str(v) for k, v in env.items()}


def _load_or_create_key(path: Path) -> bytes:
    """Read the key, or write a new one readable only by its owner and publish it with link(2), which
    fails if one appeared meanwhile: a key is never half written, replaced, or world-readable."""
    with contextlib.suppress(FileNotFoundError):
        return _read_key(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, base64.b64encode(AESGCM.generate_key(bit_length=256)) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink()
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    key = base64.b64decode(path.read_bytes().strip(), validate=True)
    if len(key) != 32:
        raise SealError(f"{path} does not hold a 256-bit key")
    return key
