"""The docs cannot drift from the CLI: every command has a page, its page holds the table of
its options that cog generates from the CLI itself (docs/commands/_options.py), and every
generated table is current."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from types import ModuleType

import pytest
from tests.conftest import ROOT

DOCS = ROOT / "docs" / "commands"
REGENERATE = ".venv/bin/cog -r docs/commands/*.md"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_options", DOCS / "_options.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMMANDS = list(_generator().commands())
_COG_BLOCK = re.compile(r"\[\[\[cog\n(.*?)\]\]\]", re.S)


def _tabled(page: str) -> set[str]:
    """The commands whose tables a page's cog blocks generate."""
    code = "\n".join(_COG_BLOCK.findall(page))
    return set(re.findall(r"""\btable\(\s*["']([^"']+)["']""", code))


@pytest.mark.parametrize("path", COMMANDS)
def test_every_command_has_its_table(path: str) -> None:
    page = DOCS / f"{path.split()[0]}.md"
    assert page.is_file(), f"no page for 'sovctl {path.split()[0]}': write {page}"
    assert path in _tabled(page.read_text()), (
        f"{page.name} has no generated option table of 'sovctl {path}': add a block\n"
        f'<!-- [[[cog\nimport _options\ncog.out(_options.table("{path}"))\n]]] -->\n'
        f"<!-- [[[end]]] -->\nand run {REGENERATE}"
    )


def test_generated_tables_are_current() -> None:
    pages = sorted(str(p.relative_to(ROOT)) for p in DOCS.glob("*.md"))
    done = subprocess.run(
        [sys.executable, "-m", "cogapp", "--check", "--diff", "--verbosity=1", *pages],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, (
        f"the option tables in docs/commands/ are not what the CLI declares: run {REGENERATE}"
        f"\n{done.stdout}{done.stderr}"
    )
