"""The sovctl command line: parse options, call the core, render the result. Nothing else."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.markup import escape
from typer.core import TyperGroup

from sovctl import __version__
from sovctl.cli import _common
from sovctl.cli._common import STATE, err_console
from sovctl.errors import SovctlError
from sovctl.result import envelope

class _SovctlGroup(TyperGroup):
    """Turns a SovctlError into its one-line message and exit code; real bugs still crash."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SovctlError as e:
            if os.environ.get("SOVCTL_DEBUG") == "1":
                traceback.print_exc()
            if STATE.json:
                err = {"type": type(e).__name__, "message": e.message, "hint": e.hint,
                       "exit_code": int(e.exit_code), "exit_name": e.exit_code.name}
                sys.stdout.write(json.dumps(envelope(STATE.command, None, err), indent=2) + "\n")
            msg = f"[bold red]error:[/] {escape(e.message)}"
            if e.hint:
                msg += f" [dim]({escape(e.hint)})[/]"
            err_console.print(msg, soft_wrap=True, highlight=False)
            ctx.exit(int(e.exit_code))


app = typer.Typer(
    cls=_SovctlGroup,
    name="sovctl",
    help="Provision and operate a sovereign AI stack: pinned weights, a supervised local "
    "runtime, proof of offline operation, honest cost figures.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sovctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            envvar="SOVCTL_HOME",
            help="Directory holding everything sovctl owns \\[default: $XDG_DATA_HOME/sovctl].",
            show_default=False,
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one versioned JSON document on stdout.")
    ] = False,
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="More detail.")] = 0,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    _common.STATE.home_path = home
    _common.STATE.json = json_out
    _common.STATE.verbose = verbose


def _register() -> None:
    from sovctl.cli import store as store_cmds

    store_cmds.register(app)
    for name in ("serve", "audit", "bench"):
        try:
            module = __import__(f"sovctl.cli.{name}", fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != f"sovctl.cli.{name}":
                raise
            continue
        module.register(app)


_register()


def main() -> None:
    app()
