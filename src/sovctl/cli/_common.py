"""What every command shares: the invocation state, the JSON switch, and the two renderers."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from sovctl.home import Home, default_home
from sovctl.result import envelope


@dataclass
class State:
    home_path: Path | None = None
    json: bool = False
    verbose: int = 0
    command: str = "sovctl"

    @property
    def home(self) -> Home:
        return Home(self.home_path or default_home())


STATE = State()
console = Console()
err_console = Console(stderr=True)

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one versioned JSON document on stdout.")
]


def begin(ctx: typer.Context, json_flag: bool) -> State:
    """Called first by every command: records its name and the per-command --json."""
    STATE.command = ctx.command_path.removeprefix(ctx.find_root().info_name or "").strip()
    STATE.json = STATE.json or json_flag
    return STATE


def emit(data: Any, render: Callable[[Console], None]) -> None:
    if STATE.json:
        sys.stdout.write(json.dumps(envelope(STATE.command, data), indent=2) + "\n")
    else:
        render(console)


def settings(flags: dict[str, Any] | None = None, profile: str | None = None):  # type: ignore[no-untyped-def]
    from sovctl import config

    return config.load(STATE.home, flags=flags, profile=profile)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
