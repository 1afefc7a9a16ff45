"""The shared secret gateways present to agents: from TARTARUS_AGENT_TOKEN or a file, never logged.

A token travels in `Authorization: Bearer TOKEN` on every gateway→agent call (over the cluster's private
network; use mTLS or a tunnel where that network is not trusted). It is compared in constant time.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

from tartarus.errors import InvalidArgument

TOKEN_ENV = "TARTARUS_AGENT_TOKEN"
TOKEN_FILE_ENV = "TARTARUS_AGENT_TOKEN_FILE"
MIN_LENGTH = 32  # e.g. `openssl rand -hex 32`: guessing it must be hopeless


@dataclass(frozen=True)
class AgentToken:
    secret: str = field(repr=False)  # never in a repr, a log line or an error message

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_LENGTH or any(c.isspace() for c in self.secret):
            raise InvalidArgument(
                f"the agent token must be at least {MIN_LENGTH} characters without whitespace "
                "(e.g. `openssl rand -hex 32`)"
            )

    @property
    def header(self) -> str:
        """The Authorization header value a gateway sends."""
        return f"Bearer {self.secret}"

    def admits(self, authorization: str | None) -> bool:
        """Whether an Authorization header carries this token (constant time in the secret)."""
        return hmac.compare_digest((authorization or "").encode(), self.header.encode())


def load_token(path: Path | None = None) -> AgentToken:
    """The token from `path`, else TARTARUS_AGENT_TOKEN_FILE, else TARTARUS_AGENT_TOKEN."""
    file = path or (Path(os.environ[TOKEN_FILE_ENV]) if os.environ.get(TOKEN_FILE_ENV) else None)
    if file is not None:
        try:
            return AgentToken(file.read_text().strip())
        except OSError as e:
            raise InvalidArgument(f"cannot read the agent token file {file}: {e.strerror}") from e
    secret = os.environ.get(TOKEN_ENV, "")
    if not secret:
        raise InvalidArgument(
            f"no agent token: set {TOKEN_ENV} (or {TOKEN_FILE_ENV}, or --token-file) to the secret that "
            "gateways and agents share"
        )
    return AgentToken(secret)
