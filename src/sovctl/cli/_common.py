"""What every command shares: the invocation state, the JSON switch, and the two renderers."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sovctl.errors import SovctlError
from sovctl.home import Home, default_home
from sovctl.units import human_bytes, human_params

__all__ = ["human_bytes", "human_params"]  # the renderers' one way to write sizes

if TYPE_CHECKING:
    from rich.console import Console

    from sovctl.config import Settings


@dataclass
class State:
    home_path: Path | None = None
    json: bool = False
    verbose: int = 0
    command: str = "sovctl"
    argv: list[str] = field(default_factory=list)
    emitted: bool = False  # the one JSON document of this invocation is already on stdout

    @property
    def home(self) -> Home:
        return Home(self.home_path or default_home())


STATE = State()


# rich is imported on first use, not at startup: `sovctl --help` never needs it.
@cache
def _stdout_console() -> Console:
    from rich.console import Console

    # soft_wrap: a line of text stays one line when piped or logged (tables still fit).
    return Console(soft_wrap=True)


@cache
def _stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def __getattr__(name: str) -> Any:
    # `from sovctl.cli._common import console, err_console` still works: the consoles are
    # created (and rich imported) by the first module that asks for one.
    if name == "console":
        return _stdout_console()
    if name == "err_console":
        return _stderr_console()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one versioned JSON document on stdout.")
]
# serve and worker: one supervisor, run in the foreground or detached the same way.
DetachOpt = Annotated[
    bool, typer.Option("--detach", "-d", help="Run in the background; state under the home.")
]


def begin(ctx: typer.Context, json_flag: bool) -> State:
    """Called first by every command: records its name and the per-command --json."""
    STATE.command = ctx.command_path.removeprefix(ctx.find_root().info_name or "").strip()
    STATE.json = STATE.json or json_flag
    return STATE


def error_info(e: SovctlError) -> dict[str, Any]:
    return {"type": type(e).__name__, "message": e.message, "hint": e.hint,
            "exit_code": int(e.exit_code), "exit_name": e.exit_code.name}


def write_json(data: Any, error: dict[str, Any] | None = None) -> None:
    import json

    from sovctl.result import envelope

    sys.stdout.write(json.dumps(envelope(STATE.command, data, error), indent=2) + "\n")
    sys.stdout.flush()
    STATE.emitted = True


def emit(data: Any, render: Callable[[Console], None], failure: SovctlError | None = None) -> None:
    """Show a command's result. With `failure` (checks that ran but did not pass) the result is
    still shown, then the failure is raised for its message and exit code; under --json both
    go into the one JSON document."""
    if STATE.json:
        write_json(data, error_info(failure) if failure else None)
    else:
        render(_stdout_console())
    if failure is not None:
        raise failure


def settings(flags: dict[str, Any] | None = None, profile: str | None = None) -> Settings:
    from sovctl import config

    return config.load(STATE.home, flags=flags, profile=profile)
