"""A template from an OCI image in a registry: converted, snapshotted with its own python3 warm, restored."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tartarus.errors import InvalidArgument
from tartarus.runtime.sandbox import SandboxOptions
from tartarus.snapshots.build import ensure_snapshot
from tartarus.snapshots.restore import restore
from tartarus.templates.build import build_template
from tartarus.templates.spec import TemplateSpec
from tartarus.templates.store import get_template, remove_template
from tests.conftest import qemu_pids

pytestmark = pytest.mark.vm


def test_image_template_snapshot_and_restore(python_ref: str, tmp_path: Path) -> None:
    spec = TemplateSpec.model_validate(
        {
            "name": "slim-test",
            "base": {"image": python_ref},
            "env": {"TEMPLATE_VAR": "from-spec"},
            "interpreter": {"preload": ["json"]},
        }
    )
    template = build_template(spec, lambda message: None)
    try:
        assert get_template("slim-test").key == template.key
        assert template.env["TEMPLATE_VAR"] == "from-spec"
        snapshot = ensure_snapshot(template, lambda message: None)

        async def main() -> tuple[str | None, str | None]:
            sb = await restore(snapshot, template, tmp_path, SandboxOptions())
            try:
                interpreter = await sb.code_interpreter()
                version = (await interpreter.run_code("import sys; sys.version_info[:2]")).result
                preloaded = (await interpreter.run_code("'json' in globals()")).result
                return version, preloaded
            finally:
                await sb.destroy()

        assert asyncio.run(main()) == ("(3, 11)", "True")
        assert not qemu_pids(tmp_path)
    finally:
        remove_template("slim-test")


def test_image_template_refuses_debian_packages(python_ref: str) -> None:
    spec = TemplateSpec.model_validate({"name": "bad", "base": {"image": python_ref}, "packages": ["curl"]})
    with pytest.raises(InvalidArgument, match="packages"):
        build_template(spec, lambda message: None)
