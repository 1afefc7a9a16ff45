"""Built templates on disk: `<cache>/templates/<name>/<key>/template.json`, naming a root filesystem
image cached separately by the hash of what goes into it (so changing a template's env or resources does
not rebuild its filesystem).

`<name>/current` names the key of the newest build, switched atomically after a build finishes.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tartarus.errors import NotFound, SetupRequired
from tartarus.paths import cache_dir


@dataclass(frozen=True)
class Template:
    name: str
    key: str
    rootfs: Path
    fstype: str
    vcpus: int = 1
    memory_mib: int = 512
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    # Modules the warm code interpreter imports before the snapshot; None: no interpreter, no snapshot.
    preload: list[str] | None = None
    # A process started before the snapshot, and the command that says it is ready.
    start: list[str] | None = None
    ready: list[str] | None = None
    ready_timeout: float = 300.0

    @property
    def snapshotted(self) -> bool:
        """Whether sandboxes of this template are restored from a snapshot rather than booted."""
        return self.preload is not None or self.start is not None

    def to_json(self) -> str:
        data = asdict(self)
        data["rootfs"] = str(self.rootfs)
        return json.dumps(data, indent=2)

    @classmethod
    def from_dir(cls, path: Path) -> Template:
        data = json.loads((path / "template.json").read_text())
        data["rootfs"] = Path(data["rootfs"])
        return cls(**data)


def templates_root() -> Path:
    return cache_dir() / "templates"


def set_current(name: str, key: str) -> None:
    link = templates_root() / name / "current"
    tmp = link.with_name(".current.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(key)
    os.replace(tmp, link)


def get_template(name: str) -> Template:
    current = templates_root() / name / "current"
    try:
        key = os.readlink(current)
    except FileNotFoundError:
        if (Path(__file__).parents[3] / "templates" / f"{name}.yaml").exists():
            raise SetupRequired(
                f"template {name!r} is not built: run `tartarus template build {name}`"
            ) from None
        raise NotFound(f"no template named {name!r}") from None
    return _load(current.parent / key)


@functools.lru_cache(maxsize=256)
def _load(build: Path) -> Template:
    """A build's directory never changes once `current` names it (a rebuild gets a new key), so it
    is read once: every create asks for its template."""
    return Template.from_dir(build)


def list_templates() -> list[Template]:
    root = templates_root()
    if not root.exists():
        return []
    return [
        Template.from_dir((d / "current").resolve())
        for d in sorted(root.iterdir())
        if (d / "current").exists()
    ]


def remove_template(name: str) -> None:
    """Delete a template's builds; running sandboxes keep working (their files stay open)."""
    root = templates_root() / name
    if not (root / "current").exists():
        raise NotFound(f"no built template named {name!r}")
    shutil.rmtree(root)


def register_template(template: Template) -> Template:
    """Record a built template under its key and make it the name's current build."""
    from tartarus.bootfiles.cache import cached

    path = cached(
        f"templates/{template.name}",
        template.key,
        lambda out: (out / "template.json").write_text(template.to_json()),
    )
    set_current(template.name, template.key)
    return Template.from_dir(path)
