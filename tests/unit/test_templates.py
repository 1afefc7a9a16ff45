"""Template specs are validated on load with errors naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tartarus.errors import InvalidArgument, NotFound
from tartarus.templates.debian import debian_mirror
from tartarus.templates.spec import TemplateSpec, builtin_spec


def test_python_ds_spec_loads() -> None:
    spec = builtin_spec("python-ds")
    assert spec.interpreter is not None and "pandas" in spec.interpreter.preload
    assert {"python3-numpy", "python3-pandas", "python3-sklearn"} <= set(spec.packages)


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
