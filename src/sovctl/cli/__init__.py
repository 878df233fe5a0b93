"""The sovctl command line: parse options, call the core, render the result. Nothing else.

`sovctl --help` must stay fast, so this module imports only typer at the top: rich, json and
every command's core modules are imported by the code paths that use them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from sovctl import __version__
from sovctl.cli import _common
from sovctl.cli._common import STATE
from sovctl.errors import SovctlError


def _click_usage_error() -> type[Exception]:
    try:
        from typer._click.exceptions import UsageError
    except ImportError:  # typer releases that use click itself
        import click

        return click.UsageError
    return UsageError


# Command groups whose modules load only when used: `sovctl --help` lists them from here.
_LAZY_GROUPS = {
    "audit": ("sovctl.cli.audit", "Prove the stack works with no network at all."),
    "bench": ("sovctl.cli.bench", "Measure models and endpoints: throughput, telemetry, "
              "energy per token and cost per million tokens."),
    "keys": ("sovctl.cli.keys", "Give each app its own API key: add, list, revoke, rotate."),
    "bundle": ("sovctl.cli.bundle", "Carry this stack to a machine with no network: its "
               "wheels, weights and settings in one directory."),
}
# Single commands whose module loads only when used: the module's function NAME is the command.
_LAZY_COMMANDS = {
    "doctor": ("sovctl.cli.provision", "Check this machine for a stack: CPU, RAM, disk, GPUs, "
               "llama.cpp, namespaces, ports, lock."),
    "profiles": ("sovctl.cli.provision", "List the hardware profiles, what each serves, and "
                 "whether it fits this machine."),
    "init": ("sovctl.cli.provision", "Write sovctl.toml from the profile that fits this "
             "machine, and say why."),
    "plan": ("sovctl.cli.provision", "Estimate a model's memory and the GPU layers, context "
             "and slots that fit this machine, before downloading it."),
    "up": ("sovctl.cli.provision", "Init, pull, plan and serve in one step; wait until the "
           "stack is ready, then show how to call it."),
    "ledger": ("sovctl.cli.ledger", "Show the token ledger: local share, spend by provider, "
               "local volume at the cloud price."),
    "cost": ("sovctl.cli.cost", "Break-even of owning vs the cloud: cost per million tokens, "
             "months to break even, verdict."),
    "tag": ("sovctl.cli.tag", "Tag local images with a vision model, through the running "
            "stack's gateway."),
    "tunnel": ("sovctl.cli.tunnel", "Add an SSH reverse tunnel from a public host you own to "
               "the running stack's gateway."),
    "bom": ("sovctl.cli.bom", "Write the bill of materials (CycloneDX JSON): models, the "
            "llama.cpp build and every Python package, with hashes."),
    "worker": ("sovctl.cli.worker", "Run an RPC worker (llama.cpp's ggml-rpc-server) for a "
               "head's [cluster], supervised."),
    "upgrade": ("sovctl.cli.upgrade", "Pull a candidate beside a model's pin, compare the two "
                "side by side; --apply switches to it with no failed request."),
    "rollback": ("sovctl.cli.upgrade", "Switch a model back to the pin it had before its last "
                 "upgrade, the same way."),
}
_LAZY = {**_LAZY_COMMANDS, **_LAZY_GROUPS}


class _SovctlGroup(TyperGroup):
    """Turns a SovctlError into its one-line message and exit code; real bugs still crash."""

    def list_commands(self, ctx: Any) -> list[str]:
        return [*super().list_commands(ctx), *(n for n in _LAZY if n not in self.commands)]

    def get_command(self, ctx: Any, name: str) -> Any:
        if name in _LAZY_GROUPS and name not in self.commands:
            import importlib

            module = importlib.import_module(_LAZY_GROUPS[name][0])
            self.add_command(typer.main.get_group(module.group()), name)
        elif name in _LAZY_COMMANDS and name not in self.commands:
            import importlib

            module = importlib.import_module(_LAZY_COMMANDS[name][0])
            holder = typer.Typer(rich_markup_mode=None, add_completion=False)
            holder.command(name)(getattr(module, name))  # the command's function has its name
            self.add_command(typer.main.get_command(holder), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in _LAZY and name not in self.commands:
                rows.append((name, _LAZY[name][1]))
                continue
            cmd = super().get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def make_context(self, info_name: Any, args: Any, parent: Any = None, **extra: Any) -> Any:
        # A fresh invocation (tests run several in one process).
        STATE.argv, STATE.command, STATE.json, STATE.emitted = list(args), "sovctl", False, False
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except Exception as e:
            _usage_json(e)
            raise

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except SovctlError as e:
            if os.environ.get("SOVCTL_DEBUG") == "1":
                import traceback

                traceback.print_exc()
            if STATE.json and not STATE.emitted:
                _common.write_json(None, _common.error_info(e))
            from rich.markup import escape

            msg = f"[bold red]error:[/] {escape(e.message)}"
            if e.hint:
                msg += f" [dim]({escape(e.hint)})[/]"
            _common._stderr_console().print(msg, soft_wrap=True, highlight=False)
            ctx.exit(int(e.exit_code))
        except Exception as e:
            if STATE.command == "sovctl" and ctx.invoked_subcommand:
                STATE.command = ctx.invoked_subcommand
            _usage_json(e)
            raise


def _usage_json(e: Exception) -> None:
    """A command line the parser rejects: click prints the usage text on stderr and exits 2;
    with --json, stdout still gets its one JSON document."""
    if not isinstance(e, _click_usage_error()) or STATE.emitted:
        return
    argv = STATE.argv[: STATE.argv.index("--")] if "--" in STATE.argv else STATE.argv
    if STATE.json or "--json" in argv:
        _common.write_json(None, {
            "type": "UsageError", "message": e.format_message(),  # type: ignore[attr-defined]
            "hint": "see --help", "exit_code": 2, "exit_name": "USAGE",
        })


app = typer.Typer(
    cls=_SovctlGroup,
    name="sovctl",
    help="Provision and operate a sovereign AI stack: pinned weights, a supervised local "
    "runtime, proof of offline operation, honest cost figures.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain help: typer's rich help imports rich's markdown and traceback machinery, which
    # triples the time of `sovctl --help`.
    rich_markup_mode=None,
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
            metavar="PATH",
            envvar="SOVCTL_HOME",
            help="Directory holding everything sovctl owns [default: $XDG_DATA_HOME/sovctl].",
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
    _common.STATE.command = "sovctl"
    _common.STATE.emitted = False


def _register() -> None:
    from sovctl.cli import serve, store

    store.register(app)
    serve.register(app)


_register()


def main() -> None:
    app()
