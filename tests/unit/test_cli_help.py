"""Every `tartarus ... --help` renders: help text is rich markup, so a stray `[/x]` in one option's help
crashes that command's help (it did for `image pull`). The tree is walked, so new commands are covered."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import typer
from typer.core import TyperGroup
from typer.testing import CliRunner

from tartarus.cli.main import app


def _paths(command: object, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if isinstance(command, TyperGroup):  # typer vendors click: its groups are not `click.Group`s
        for name, sub in command.commands.items():
            yield from _paths(sub, (*path, name))


COMMANDS = list(_paths(typer.main.get_command(app)))


def test_the_walk_reaches_nested_subcommands() -> None:
    assert ("image", "pull") in COMMANDS and ("sandbox", "create") in COMMANDS and len(COMMANDS) > 20


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "tartarus")
def test_help_renders(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert "Usage:" in result.output
