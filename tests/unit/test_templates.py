"""Template specs are validated on load with errors naming the file and the field."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from tartarus.errors import InvalidArgument, NotFound, TartarusError
from tartarus.images.local import RECIPES
from tartarus.templates import debian
from tartarus.templates.build import build_template
from tartarus.templates.debian import debian_mirror
from tartarus.templates.spec import LocalImageBase, TemplateSpec, builtin_spec


def test_python_ds_spec_loads() -> None:
    spec = builtin_spec("python-ds")
    assert spec.interpreter is not None and "pandas" in spec.interpreter.preload
    assert isinstance(spec.base, LocalImageBase) and spec.base.local_image in RECIPES
    assert not spec.packages


def test_python_ds_pins_every_pip_requirement() -> None:
    """An unpinned requirement would make the build depend on the day it ran, under the same cache key."""
    requirements = [
        word
        for step in builtin_spec("python-ds").steps
        if step.startswith("pip install")
        for word in shlex.split(step)
        if not word.startswith("-") and word not in ("pip", "install")
    ]
    assert {r.split("==")[0] for r in requirements} >= {"numpy", "pandas", "scikit-learn"}
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][0-9A-Za-z.]*", r) for r in requirements), requirements


def test_local_image_base_names_a_recipe() -> None:
    spec = TemplateSpec.model_validate({"name": "x", "base": {"local_image": "python:2.7-fat"}})
    with pytest.raises(NotFound, match=r"python:3\.11-slim"):
        build_template(spec, lambda message: None)


def test_packages_need_a_debian_base() -> None:
    spec = TemplateSpec.model_validate(
        {"name": "x", "base": {"local_image": "python:3.11-slim"}, "packages": ["curl"]}
    )
    with pytest.raises(InvalidArgument, match="packages"):
        build_template(spec, lambda message: None)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("name: Bad Name\nbase: {debian: bookworm}\n", "name"),
        ("name: ok\nbase: {debian: bookworm}\nresources: {vcpus: 0}\n", "resources.vcpus"),
        ("name: ok\nbase: {debian: bookworm}\nsurprise: 1\n", "surprise"),
        ("name: ok\n", "base"),
    ],
)
def test_invalid_specs_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(InvalidArgument) as e:
        TemplateSpec.load(path)
    assert str(path) in e.value.message and field in e.value.message


def test_unparseable_yaml(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(InvalidArgument, match="cannot read"):
        TemplateSpec.load(path)


def test_unknown_builtin() -> None:
    with pytest.raises(NotFound, match="python-ds"):
        builtin_spec("nope")


def test_mirror_comes_from_apt_sources() -> None:
    assert debian_mirror().startswith(("http://", "https://"))


def _fake_debootstrap(tmp_path: Path, failures: int) -> Path:
    """A `debootstrap` on PATH that fails like an unreachable mirror `failures` times, then succeeds."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "debootstrap"
    script.write_text(
        "#!/bin/sh\n"
        f"n=$(cat {tmp_path}/count 2>/dev/null || echo 0); echo $((n + 1)) > {tmp_path}/count\n"
        'eval tree=\\${$(($# - 1))}; mkdir -p "$tree"\n'  # debootstrap ARGS TREE MIRROR: it makes TREE
        f'[ "$n" -ge {failures} ] && exit 0\n'
        'echo "E: Failed getting release file" >&2; exit 1\n'
    )
    script.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize(("failures", "ok"), [(2, True), (4, False)])
def test_debootstrap_is_retried_then_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failures: int, ok: bool
) -> None:
    monkeypatch.setenv("PATH", f"{_fake_debootstrap(tmp_path, failures)}:{os.environ['PATH']}")
    monkeypatch.setattr(debian, "RETRY_PAUSE_S", 0.0)
    tree = tmp_path / "tree"
    if ok:
        debian.debootstrap(["bookworm"], tree, "http://mirror.invalid/debian")
        assert tree.is_dir()
    else:
        with pytest.raises(TartarusError, match=r"failed 4 times.*Failed getting release file"):
            debian.debootstrap(["bookworm"], tree, "http://mirror.invalid/debian")
        assert not tree.exists()  # no partial tree left behind
    assert (tmp_path / "count").read_text().strip() == str(min(failures + 1, 4))
