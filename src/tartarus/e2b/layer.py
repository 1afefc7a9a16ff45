"""What the E2B routes share: the daemon's client, and how E2B's names map onto Tartarus."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from tartarus.e2b.upstream import Upstream
from tartarus.e2b.watchers import Watchers

# Templates E2B users name that Tartarus has under another name: the code interpreter's runs on
# python-ds. (`base` is a template of its own: templates/base.yaml.)
DEFAULT_ALIASES = {"code-interpreter-v1": "python-ds"}
# Who envd runs a command as when the SDK names nobody, by the sandbox's template: E2B's templates run
# as `user` (home /home/user); Tartarus's own run as root, as their /v1 commands do.
DEFAULT_USERS = {"base": "user"}
MAX_REMEMBERED = 10_000  # sandboxes whose template is remembered (it never changes; ids are not reused)


@dataclass
class Layer:
    upstream: Upstream
    aliases: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ALIASES))
    users: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_USERS))
    watchers: Watchers = field(default_factory=Watchers)
    _templates: dict[str, str] = field(default_factory=dict)

    def template(self, name: str) -> str:
        return self.aliases.get(name, name)

    async def default_user(self, up: Upstream, sandbox_id: str) -> str | None:
        """The user an envd call that names none runs as in this sandbox (None: the agent's, root);
        `up` is bound to the request's credential, which may read its sandbox's record."""
        template = self._templates.get(sandbox_id)
        if template is None:
            template = (await up.get(up.key, sandbox_id)).template
            if len(self._templates) >= MAX_REMEMBERED:
                self._templates.clear()
            self._templates[sandbox_id] = template
        return self.users.get(template)


def layer_of(connection: HTTPConnection) -> Layer:
    layer = connection.app.state.layer
    assert isinstance(layer, Layer)
    return layer


def upstream_of(connection: HTTPConnection) -> Upstream:
    """The daemon's client for a data-plane request, bound to the credential it presented (app.py)."""
    credential: str = connection.state.e2b_credential
    return layer_of(connection).upstream.bound(credential)
