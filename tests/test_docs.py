"""The docs cannot drift from the CLI: every option that `--help` lists is named on the page
of its command, and every command has a page."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer
from tests.conftest import ROOT

from sovctl.cli import app

DOCS = ROOT / "docs" / "commands"


def _walk(cmd: Any, ctx: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, cmd
    if hasattr(cmd, "list_commands"):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            yield from _walk(sub, type(ctx)(sub, parent=ctx, info_name=name), (*path, name))


def _commands() -> list[tuple[tuple[str, ...], Any]]:
    root = typer.main.get_command(app)
    context = root.make_context("sovctl", ["--help"], resilient_parsing=True)
    return [(p, c) for p, c in _walk(root, context, ()) if p]


COMMANDS = _commands()


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_option_is_on_its_page(path: tuple[str, ...], cmd: Any) -> None:
    page = DOCS / f"{path[0]}.md"
    assert page.is_file(), f"no page for 'sovctl {path[0]}': write {page}"
    text = page.read_text()
    missing = [opt for param in cmd.params for opt in param.opts
               if opt.startswith("--") and opt != "--help" and opt not in text]
    assert not missing, f"{page.name} does not name {missing} of 'sovctl {' '.join(path)}'"
