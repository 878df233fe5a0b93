"""The option tables of docs/commands/*.md, generated from the CLI itself with cog.

Regenerate every page after changing a command's options (CI checks they are current):

    .venv/bin/cog -r docs/commands/*.md

A page holds one block per command; cog runs the code between the markers and writes what it
prints between `]]] -->` and the end marker, replacing what was there:

    <!-- [[[cog
    import _options
    cog.out(_options.table("audit blackout", usage=True))
    ]]] -->
    <!-- [[[end]]] -->

cog puts this directory on `sys.path`, so `import _options` finds this file. Everything in the
tables is what `--help` declares (names, metavar or type, default, help text), taken from the
same click/typer command objects `sovctl` runs, lazily loaded groups included: no terminal
width, no value of this machine.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

__all__ = ["commands", "table"]

HEADER = "| option | value | default | description |\n|---|---|---|---|\n"


def _root() -> tuple[Any, Any]:
    import typer

    from sovctl.cli import app

    root = typer.main.get_command(app)
    return root, root.make_context("sovctl", ["--help"], resilient_parsing=True)


def _child(cmd: Any, ctx: Any, name: str) -> tuple[Any, Any]:
    sub = cmd.get_command(ctx, name)  # loads a lazily registered group or command
    if sub is None:
        raise LookupError(f"no command {name!r} under {ctx.command_path!r}")
    return sub, type(ctx)(sub, parent=ctx, info_name=name)


def _find(path: str) -> tuple[Any, Any]:
    cmd, ctx = _root()
    for name in path.split():
        cmd, ctx = _child(cmd, ctx, name)
    return cmd, ctx


def commands() -> Iterator[str]:
    """Every command that takes options, as its path ("serve", "audit blackout"): the leaves
    of the tree, hidden ones left out."""

    def walk(cmd: Any, ctx: Any, path: tuple[str, ...]) -> Iterator[str]:
        if not hasattr(cmd, "list_commands"):
            yield " ".join(path)
            return
        for name in cmd.list_commands(ctx):
            sub, sub_ctx = _child(cmd, ctx, name)
            if not sub.hidden:
                yield from walk(sub, sub_ctx, (*path, name))

    yield from walk(*_root(), ())


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


_BRACKETS = re.compile(r" *\[((?:[^\[\]]|\[[^\[\]]*\])*)\]")  # one level of nesting: [serve]


def _split_brackets(help_text: str) -> tuple[str, list[str]]:
    """Help text without its `[default: ...]`, `[required]`, `[env var: ...]`, ... groups, and
    the parts of those groups, whether click added them or the author wrote them."""
    parts: list[str] = []

    def take(m: re.Match[str]) -> str:
        inner = [p.strip() for p in re.split(r";\s+(?![^\[]*\])", m[1])]
        known = [p for p in inner if re.match(r"(default|env|env var|required)\b", p)]
        if not known:
            return m[0]  # a bracket of the text itself: [cluster], [pull.NAME]
        parts.extend(known)
        rest = [p for p in inner if p not in known]
        return f" [{'; '.join(rest)}]" if rest else ""

    return _BRACKETS.sub(take, help_text).strip(), parts


def _row(param: Any, ctx: Any) -> str | None:
    record = param.get_help_record(ctx)
    if record is None:  # hidden
        return None
    names_text, help_text = record
    if param.param_type_name == "argument":
        label, _, value = names_text.partition(" ")
        names = [label + ("..." if param.nargs == -1 else "")]
    else:
        groups = re.split(r" / |; ", names_text)  # --repack / --no-repack
        m = re.fullmatch(r"((?:\S+, )*\S+)(?: (.+))?", groups[0])
        assert m is not None, names_text
        names = [", ".join(_code(_cell(n)) for n in m[1].split(", "))]
        names += [", ".join(_code(_cell(n)) for n in g.split(", ")) for g in groups[1:]]
        value = m[2] or ""
    if value.startswith("<") and value.endswith(">"):  # typer's type display, e.g. <int>
        value = value[1:-1]
    repeated = param.multiple or param.nargs == -1
    if repeated and value.startswith("list[") and value.endswith("]"):
        value = value[5:-1]
    if repeated and param.param_type_name != "argument":
        value += "..."
    text, extras = _split_brackets(help_text)
    default = ""
    notes = []
    for extra in extras:
        key, _, rest = extra.partition(":")
        if key == "default":
            default = rest.strip()
        elif key == "required":
            default = "required"
        else:  # env var: NAME
            notes.append(extra)
    if notes:
        text += f" [{'; '.join(notes)}]"
    text = " ".join(text.split())  # click separates its own [...] by two spaces
    if param.param_type_name == "argument":
        option = _code(_cell(names[0])) + " (argument)"
    else:
        option = " / ".join(names)
    return f"| {option} | {_code(_cell(value))} | {_cell(default)} | {_cell(text)} |\n"


def table(path: str, *, usage: bool = False) -> str:
    """Markdown for the command at PATH ("serve", "audit blackout"): its usage line when asked,
    then one row per argument and option that --help lists (--help itself left out)."""
    cmd, ctx = _find(path)
    out = ""
    if usage:
        out += f"```text\n{' '.join([ctx.command_path, *cmd.collect_usage_pieces(ctx)])}\n```\n\n"
    rows = [row for param in cmd.params if (row := _row(param, ctx))]
    return out + HEADER + "".join(rows) + "\n"  # the blank line ends the table
