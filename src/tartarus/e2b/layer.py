"""What the E2B routes share: the daemon's client, the token mint, and how E2B's names map onto Tartarus."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from tartarus.e2b.tokens import TokenMint
from tartarus.e2b.upstream import Upstream

# Templates E2B users name, until Tartarus has templates of those names (issue 17 item 5): the SDKs'
# defaults run on python-ds, which has bash and python3.
DEFAULT_ALIASES = {"base": "python-ds", "code-interpreter-v1": "python-ds"}


@dataclass
class Layer:
    upstream: Upstream
    tokens: TokenMint
    aliases: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ALIASES))

    def template(self, name: str) -> str:
        return self.aliases.get(name, name)


def layer_of(connection: HTTPConnection) -> Layer:
    layer = connection.app.state.layer
    assert isinstance(layer, Layer)
    return layer
