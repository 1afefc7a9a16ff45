"""Template specs (templates/*.yaml), validated on load with errors that name the file and field."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tartarus.errors import InvalidArgument, NotFound
from tartarus.paths import REPO_ROOT

SPEC_DIR = REPO_ROOT / "templates"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vcpus: int = Field(1, ge=1, le=16)
    memory_mib: int = Field(512, ge=128, le=65536)


class DebianBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    debian: str = Field(pattern=r"^[a-z]+$")


class Interpreter(BaseModel):
    """A warm Python process started before the snapshot, so `run_code` answers at once."""

    model_config = ConfigDict(extra="forbid")
    preload: list[str] = Field(default_factory=list, description="modules imported before the snapshot")


class Start(BaseModel):
    """A process started before the snapshot (a server, a kernel), so every sandbox has it running."""

    model_config = ConfigDict(extra="forbid")
    command: list[str] = Field(min_length=1)
    ready: list[str] | None = Field(None, description="polled until it exits 0; then the snapshot is taken")
    ready_timeout: float = Field(300.0, gt=0, le=3600)


class ImageBase(BaseModel):
    """An OCI or Docker image (registry reference, `oci:DIR[:TAG]` or `docker-archive:FILE`)."""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(min_length=1, max_length=1024)
    insecure: bool = Field(False, description="allow plain HTTP to a registry that is not on loopback")


class LocalImageBase(BaseModel):
    """A public image that Tartarus builds on this host from Debian packages (`tartarus.images.local`),
    for hosts that reach no image registry; converted like any other image."""

    model_config = ConfigDict(extra="forbid")
    local_image: str = Field(min_length=1, max_length=128)


class TemplateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    base: DebianBase | ImageBase | LocalImageBase
    packages: list[str] = Field(default_factory=list)
    steps: list[str] = Field(
        default_factory=list, description="shell commands run in a build VM with network, in order"
    )
    resources: Resources = Field(default_factory=lambda: Resources())
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str | None = Field(None, description="default: the image's, or / for a Debian base")
    interpreter: Interpreter | None = None
    start: Start | None = None
    # `sandbox.backend.Backend` (the template layer sits below the sandbox's). Not a build input: both
    # backends serve the same root filesystem, so it is left out of the template's key.
    backend: Literal["kvm", "tcg", "gvisor"] | None = Field(
        None, description="the backend its sandboxes run on unless a create asks for another"
    )

    @classmethod
    def load(cls, path: Path) -> TemplateSpec:
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise InvalidArgument(f"{path}: cannot read template spec: {e}") from e
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            errors = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise InvalidArgument(f"{path}: invalid template spec: {errors}") from e


def builtin_spec(name: str) -> TemplateSpec:
    path = SPEC_DIR / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in SPEC_DIR.glob("*.yaml")))
        raise NotFound(f"no template named {name!r} (known: {known})")
    return TemplateSpec.load(path)
