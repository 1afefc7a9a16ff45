from __future__ import annotations

from collections.abc import Iterator

import pytest

from tartarus.sdk import Sandbox
from tartarus.templates.built import Template, get_template


@pytest.fixture(scope="session")
def python_ds() -> Template:
    return get_template("python-ds")


@pytest.fixture(scope="module")
def sandbox(daemon_url: str) -> Iterator[Sandbox]:
    """One running python-ds sandbox shared by a module's tests (each boot costs seconds under TCG)."""
    with Sandbox.create("python-ds", url=daemon_url) as sb:
        yield sb
